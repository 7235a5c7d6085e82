"""Where training writes its numbers: TensorBoard through clu when TensorFlow is there, else not.

`clu.metric_writers` imports TensorFlow (its TensorBoard writer does), and the GPU and TPU
machines this trains on often have none. `create_writer(workdir)` therefore:

- always writes `DIR/metrics.jsonl` (one JSON object a line: `{"step", "kind", ...}`; images
  as PNG files under `DIR/images/<name>/<step>.png`), which the report and tests read;
- adds clu's default writer (TensorBoard event files + absl log lines) when TensorFlow is
  importable and `kind` is "auto" or "clu", else a writer of absl log lines. The log lines are
  INFO: hidden on a quiet console (`sipak_jax.console`), whose per-epoch line says what matters.

Every writer has the clu `MetricWriter` methods the loop uses: `write_scalars`,
`write_images`, `write_texts`, `write_hparams`, `flush`, `close`. Only process 0 writes files;
the others log through absl (`just_logging`), without importing TensorFlow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping

import numpy as np
from absl import logging

from sipak_jax import console

WRITER_KINDS = ("auto", "clu", "jsonl")


def tensorflow_available() -> bool:
    """True when `import tensorflow` would work (checked without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def _scalar(v):
    v = np.asarray(v)
    if v.size != 1:
        raise ValueError(f"a scalar was expected, got shape {v.shape}")
    return v.item()


class JsonlWriter:
    """Appends scalars/texts/hparams to `DIR/metrics.jsonl` and images as PNG files."""

    def __init__(self, workdir: str):
        self._dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self._f = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115

    def _line(self, obj):
        obj = {"time": round(time.time(), 3), **obj}
        self._f.write(json.dumps(obj, allow_nan=True) + "\n")

    def write_scalars(self, step: int, scalars: Mapping):
        self._line(
            {"step": int(step), "kind": "scalars", **{k: _scalar(v) for k, v in scalars.items()}}
        )

    def write_texts(self, step: int, texts: Mapping):
        self._line({"step": int(step), "kind": "texts", **{k: str(v) for k, v in texts.items()}})

    def write_hparams(self, hparams: Mapping):
        self._line({"step": 0, "kind": "hparams", **{k: _jsonable(v) for k, v in hparams.items()}})

    def write_images(self, step: int, images: Mapping):
        import cv2

        for name, batch in images.items():
            batch = np.asarray(batch)
            if batch.ndim == 3:
                batch = batch[None]
            out_dir = os.path.join(self._dir, "images", name.replace("/", "_"))
            os.makedirs(out_dir, exist_ok=True)
            paths = []
            for i, img in enumerate(batch):
                if img.dtype != np.uint8:
                    img = np.clip(np.round(np.asarray(img, np.float32) * 255.0), 0, 255)
                    img = img.astype(np.uint8)
                suffix = "" if len(batch) == 1 else f"_{i}"
                path = os.path.join(out_dir, f"{int(step):08d}{suffix}.png")
                cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                paths.append(os.path.relpath(path, self._dir))
            self._line({"step": int(step), "kind": "images", "name": name, "files": paths})

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


class ConsoleWriter:
    """Logs scalars and texts through absl (the no-TensorFlow stand-in for clu's console)."""

    def write_scalars(self, step, scalars):
        body = ", ".join(f"{k}={_scalar(v):.6g}" for k, v in sorted(scalars.items()))
        logging.info("[%d] %s", int(step), body)

    def write_texts(self, step, texts):
        for k, v in texts.items():
            logging.info("[%d] %s: %s", int(step), k, v)

    def write_hparams(self, hparams):
        logging.info("hparams: %s", {k: _jsonable(v) for k, v in hparams.items()})

    def write_images(self, step, images):
        del step, images

    def flush(self):
        pass

    def close(self):
        pass


class FanOut:
    """Sends every call to several writers."""

    def __init__(self, writers):
        self.writers = list(writers)

    def _all(self, name, *args):
        for w in self.writers:
            getattr(w, name)(*args)

    def write_scalars(self, step, scalars):
        self._all("write_scalars", step, scalars)

    def write_images(self, step, images):
        self._all("write_images", step, images)

    def write_texts(self, step, texts):
        self._all("write_texts", step, texts)

    def write_hparams(self, hparams):
        self._all("write_hparams", {k: _jsonable(v) for k, v in hparams.items()})

    def flush(self):
        self._all("flush")

    def close(self):
        self._all("close")


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return str(tuple(v))
    return str(v)


def create_writer(workdir: str, kind: str = "auto", *, just_logging: bool = False):
    """The writer for one run; `kind` is "auto" (clu when TensorFlow is importable), "clu" or
    "jsonl" (console + JSON lines, never imports TensorFlow). Returns (writer, uses_clu)."""
    if kind not in WRITER_KINDS:
        raise console.UserError(f"config.writer must be one of {WRITER_KINDS}, got {kind!r}")
    use_clu = kind == "clu" or (kind == "auto" and tensorflow_available())
    if kind == "clu" and not tensorflow_available():
        raise console.UserError(
            "config.writer='clu' needs TensorFlow (clu's TensorBoard writer imports it); "
            "install tensorflow-cpu or use config.writer='auto'"
        )
    if just_logging:
        return ConsoleWriter(), False
    writers = [JsonlWriter(workdir)]
    if use_clu:
        with console.native_stderr_quiet():  # TensorFlow's C++ start-up lines
            _hide_accelerators_from_tensorflow()
            from clu import metric_writers

        writers.append(metric_writers.create_default_writer(workdir))
    else:
        writers.append(ConsoleWriter())
    return FanOut(writers), use_clu


def _hide_accelerators_from_tensorflow():
    """TensorFlow must not grab GPU memory that JAX needs."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
