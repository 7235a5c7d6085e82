"""`python -m sipak_jax.serve --checkpoint=SPEC [--host=127.0.0.1] [--port=8000] [--token=T |
--token_file=F]`: load and compile the model, then serve the page and the API (uvicorn).

Binding to anything but a loopback address needs a token (`--token_file` keeps it out of the
process list); with a token, every API call needs `Authorization: Bearer TOKEN`, on 127.0.0.1
too. Mistakes end in one `error:` line and exit status 2 before anything is served.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from collections.abc import Sequence

from sipak_jax import console
from sipak_jax.serve.uploads import MB, Limits

VERSION = "0.1.0"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sipak_jax.serve",
        description="Serve the screening page and HTTP API for a model DIR or an ensemble.",
    )
    p.add_argument("--checkpoint", required=True, help="model DIR, A,B,C, or a fold=all workdir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN")
    p.add_argument("--token_file", default=None, help="read the token from this file")
    p.add_argument("--batch_sizes", default="1,8,32", help="compiled batch sizes")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="batching window")
    p.add_argument("--max_files", type=int, default=Limits.max_files)
    p.add_argument("--max_request_mb", type=int, default=Limits.max_request_bytes // MB)
    p.add_argument("--max_pixels", type=int, default=Limits.max_pixels)
    p.add_argument("--max_zip_entries", type=int, default=Limits.max_zip_entries)
    p.add_argument("--max_zip_mb", type=int, default=Limits.max_zip_bytes // MB)
    p.add_argument("--verbosity", type=int, default=0, help="1: libraries' and access logs")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(args) -> str | None:
    """The token from --token or --token_file; UserError for both, an empty one, or a
    non-loopback --host without one."""
    if args.token is not None and args.token_file is not None:
        raise console.UserError("give --token or --token_file, not both")
    token = args.token
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise console.UserError(f"--token_file={args.token_file}: {e.strerror}") from None
    if token is not None and len(token) < 8:
        raise console.UserError("the token must have at least 8 characters")
    if token is None and not is_loopback(args.host):
        raise console.UserError(
            f"--host={args.host} would let other machines read patients' images: give "
            "--token_file=FILE (or --token=TOKEN), or bind to 127.0.0.1"
        )
    return token


def _limits(args) -> Limits:
    values = dict(
        max_request_bytes=args.max_request_mb * MB,
        max_files=args.max_files,
        max_pixels=args.max_pixels,
        max_zip_entries=args.max_zip_entries,
        max_zip_bytes=args.max_zip_mb * MB,
    )
    bad = [k for k, v in values.items() if v < 1]
    if bad:
        raise console.UserError(f"--{bad[0].replace('_bytes', '_mb')} must be positive")
    return Limits(**values)


def model_info(predictor, spec: str) -> dict:
    """What GET /api/v1/model says: taxonomy, preprocessing, members with their source."""
    from sipak_jax import model_io

    paths = list(getattr(predictor, "members", None) or []) or [spec]
    members = []
    for path in paths:
        meta = model_io.read_metadata(path).to_dict()
        keep = ("kind", "model", "source", "temperature", "fold", "format")
        members.append({"path": os.fspath(path), **{k: meta.get(k) for k in keep}})
    return {
        "version": VERSION,
        "taxonomy": predictor.taxonomy.to_dict(),
        "preprocessing": dict(predictor.spec),
        "temperature": predictor.temperature,
        "members": members,
        "ensemble": len(members) > 1,
    }


def build(args):
    """(app, engine) for parsed flags: the model loaded and compiled, the engine started."""
    from sipak_jax.serve import app as app_module
    from sipak_jax.serve import engine as engine_module

    token = resolve_token(args)
    limits = _limits(args)
    try:
        sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise console.UserError(
            f"--batch_sizes={args.batch_sizes!r}: positive integers, e.g. 1,8,32"
        ) from None
    try:
        predictor = engine_module.load(args.checkpoint, sizes)
    except (FileNotFoundError, ValueError, console.UserError) as e:
        message = (
            str(e) if str(e).startswith("--checkpoint") else f"--checkpoint={args.checkpoint}: {e}"
        )
        raise console.UserError(message) from None
    engine = engine_module.Engine(predictor, sizes, args.max_wait_ms / 1000).start()
    info = model_info(predictor, args.checkpoint)
    service = app_module.Service(engine, info, limits, token, min(4, os.cpu_count() or 1))
    return app_module.create_app(service), engine


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.quiet_libraries(args.verbosity)
    t0 = time.perf_counter()
    try:
        app, engine = build(args)
    except console.UserError as e:
        raise console.fail(str(e)) from None
    import uvicorn

    console.say(
        f"model {args.checkpoint}: compiled batch sizes {', '.join(map(str, engine.batch_sizes))} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    console.say(f"serving http://{args.host}:{args.port}/ (Ctrl-C stops)")
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level="info" if args.verbosity else "warning",
            access_log=bool(args.verbosity),
            server_header=False,
        )
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
