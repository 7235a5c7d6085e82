"""Atomic file writes: a reader never sees half a file, a crash never leaves one behind.

The one owner of "write to a temporary file in the same directory, then rename": results,
metadata, reports, predictions, caches and downloads all go through these functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside `path`; renames it onto `path` when the block ends
    without an error, removes it otherwise."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj) -> str:
    """Strict JSON text of `obj` (numpy scalars and arrays and bytes allowed; NaN and Inf are
    refused with a ValueError, as they are not JSON), indented, ending in a newline."""
    return json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """`to_json(obj)` written atomically (nothing is written when `obj` is not JSON)."""
    atomic_write_text(path, to_json(obj))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yields a temporary directory beside `path`; renames it onto `path` (which must not
    exist) when the block ends without an error, removes it otherwise: a crash never leaves
    a half-written tree at `path`."""
    import shutil

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        yield tmp
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
