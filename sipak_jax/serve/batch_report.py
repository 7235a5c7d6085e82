"""The batch report the page exports: one self-contained HTML page of a batch's rows.

`render(rows, model_info) -> str`: the model, the counts (predicted, flagged, failed), then one
table row per file, flagged abnormal first, then by abnormal probability, with the call, the
clinical reading, the probabilities as bars (inline CSS widths, no script), and every failed
file with its message. Every value is HTML-escaped: a file name is only ever text.
"""

from __future__ import annotations

import datetime
import html

GENERATOR = "sipak_jax.serve"

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;
color:#1b1b1b}table{border-collapse:collapse;font-size:.9em;width:100%}
th,td{border:1px solid #d5dbe1;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f1f4f7}.flag{color:#a00000;font-weight:600}.err{color:#a00000}
.bar{background:#2f6db5;height:.7em;display:inline-block;vertical-align:middle}
.p{white-space:nowrap;font-size:.85em}.muted{color:#555}
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _sort_key(row: dict):
    if row.get("error"):
        return (2, 0.0)
    p = row.get("p_abnormal")
    return (0 if row.get("flagged") else 1, -(float(p) if p is not None else 0.0))


def _probabilities(row: dict) -> str:
    out = []
    for name, p in zip(row.get("class_names") or [], row.get("probabilities") or [], strict=False):
        width = max(0.0, min(1.0, float(p))) * 100
        out.append(
            f'<div class="p">{_e(name)} <span class="bar" style="width:{width:.0f}px">'
            f"</span> {float(p):.3f}</div>"
        )
    return "".join(out)


def _row(row: dict) -> str:
    if row.get("error"):
        error = _e(row["error"])
        return f'<tr><td>{_e(row.get("path"))}</td><td colspan="5" class="err">{error}</td></tr>'
    flag = row.get("flagged")
    call = "abnormal" if flag else ("NILM / normal" if flag is False else "")
    p_ab = row.get("p_abnormal")
    unc = row.get("uncertainty")
    return (
        f"<tr><td>{_e(row.get('path'))}</td>"
        f'<td class="{"flag" if flag else ""}">{_e(row.get("label"))}<br>{_e(call)}</td>'
        f"<td>{_e(row.get('bethesda'))}</td>"
        f"<td>{'' if p_ab is None else f'{float(p_ab):.3f}'}</td>"
        f"<td>{_probabilities(row)}</td>"
        f"<td>{'' if unc is None else f'{float(unc):.4f}'}</td></tr>"
    )


def render(rows: list[dict], model_info: dict) -> str:
    """The page (module docstring)."""
    rows = sorted(rows, key=_sort_key)
    failed = sum(1 for r in rows if r.get("error"))
    flagged = sum(1 for r in rows if r.get("flagged"))
    members = model_info.get("members") or []
    model = ", ".join(str(m.get("path")) for m in members)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(_row(r) for r in rows)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta name="generator" content="{GENERATOR}">'
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">"
        f"<title>Screening batch report</title><style>{_CSS}</style></head><body>"
        "<h1>Screening batch report</h1>"
        f'<p class="muted">{_e(when)}; model {_e(model)}; temperature-scaled probabilities. '
        "A screening aid: every call needs a cytologist's review.</p>"
        f"<p>{len(rows) - failed} cells classified, {flagged} flagged abnormal, "
        f"{failed} files failed.</p>"
        "<table><thead><tr><th>file</th><th>call</th><th>clinical reading</th>"
        "<th>p(abnormal)</th><th>probabilities</th><th>uncertainty</th></tr></thead>"
        f"<tbody>{body}</tbody></table></body></html>"
    )
