"""Shared by the configs: `parse_arg`, the `configs/<name>.py:key=value,...` argument parser."""


def parse_arg(arg, **defaults):
    """'fold=2,flag' -> {'fold': '2', 'flag': True}, typed like `defaults`; unknown keys fail."""
    out = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in out:
            raise ValueError(
                f"unknown config argument {key!r} in {arg!r}; known: {', '.join(sorted(out))}"
            )
        if not sep:
            out[key] = True
        elif isinstance(defaults[key], bool):
            out[key] = value.strip().lower() in ("1", "true", "yes")
        else:
            out[key] = type(defaults[key])(value.strip())
    return out
