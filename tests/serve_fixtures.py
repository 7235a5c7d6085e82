"""Shared by the server's tests (not a test module): a tiny model DIR, test images, a started
engine, and a real uvicorn server in a thread."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import zlib

import cv2
import numpy as np

SIZE = 32
TEMPERATURE = 1.3


def make_model_dir(path, seed: int = 0) -> str:
    """A width-8 ResNet-18 at 32 px with SIPaKMeD's taxonomy, saved as a converted DIR."""
    from flax import nnx

    from sipak_jax import model_io, preprocessing
    from sipak_jax.models import ResNet
    from tfds_sipakmed.taxonomy import SIPAKMED

    model = ResNet(18, SIPAKMED.num_classes, width=8, rngs=nnx.Rngs(seed))
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=SIPAKMED,
        preprocessing=preprocessing.spec_for("scratch", image_size=SIZE),
        temperature=TEMPERATURE,
    )
    model_io.save_model_dir(path, model, meta)
    return str(path)


def cell(seed=0, h=50, w=40) -> np.ndarray:
    """A colourful RGB image with structure."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = rng.integers(0, 255, 3, dtype=np.uint8)
    colour = tuple(int(v) for v in rng.integers(0, 255, 3))
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 3, colour, -1)
    img[: h // 4] = rng.integers(0, 255, (h // 4, w, 3), dtype=np.uint8)
    return img


def encode(rgb: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, rgb[..., ::-1])
    assert ok
    return buf.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bomb(width=30_000, height=30_000, rows=64) -> bytes:
    """A valid-looking 8-bit RGB PNG header of width x height with only `rows` rows of
    compressed zeros: a few kB that claim 2.7 GB of pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = zlib.compress(b"\x00" * ((3 * width + 1) * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", raw)


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Serves `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
