"""The model behind the service: one worker thread that owns the predictor and batches requests.

`Engine(predictor, batch_sizes=(1, 8, 32), max_wait_s=0.005)`:

- `start()` compiles the predictor once for each batch size (a zero batch through each), then
  starts the worker thread; `close()` stops it.
- `predict(images) -> Future[(probs [N, K], uncertainty [N] | None)]`: images (uint8
  [N, S, S, 3]) are queued. The worker takes the first job, then whatever else is already
  queued and, while requests are on their way (`with engine.incoming():` around a request's
  decoding and its `predict` call), what arrives within `max_wait_s`, up to the largest batch
  size (a lone request never waits), runs them as one batch
  (in chunks of the largest size, the last padded to the smallest compiled size that holds
  it: nothing is compiled after `start`) and splits the results back. A job fails only on
  its own: an exception is set on the futures of that batch and the worker carries on.
- `explain(image, method, target) -> Future[map [S, S] in [0, 1]]`: one image through
  `predictor.explain` on the same thread (JAX work is never interleaved).
- `describe(method)`: where a map of that method is computed (layer, stage, map size, input
  size; per member for an ensemble).

The predictor is `sipak_jax.ensemble.load_predictor(spec)` (a `Predictor` or an
`EnsemblePredictor`). Its batches are padded to its public `batch_size`; the worker sets that
attribute (on every member) to the batch size it runs, only ever from its own thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import queue
import threading
import time

import numpy as np

DEFAULT_BATCH_SIZES = (1, 8, 32)
EXPLAIN_METHODS = {"gradcam": "gradcam", "integrated_gradients": "ig", "ig": "ig"}


def load(spec: str, batch_sizes=DEFAULT_BATCH_SIZES):
    """The predictor for a checkpoint spec (one model DIR, A,B,C or a fold=all workdir)."""
    from sipak_jax import ensemble

    return ensemble.load_predictor(spec, batch_size=max(batch_sizes))


def _members(predictor) -> list:
    return list(getattr(predictor, "predictors", None) or [predictor])


def _set_batch_size(predictor, size: int) -> None:
    for p in [predictor, *_members(predictor)]:
        p.batch_size = int(size)


@dataclasses.dataclass
class _Job:
    kind: str  # "predict" | "explain"
    images: np.ndarray
    future: concurrent.futures.Future
    method: str | None = None
    target: int | None = None


_WAKE = _Job("wake", np.zeros((0,)), concurrent.futures.Future())


class Engine:
    """Module docstring."""

    def __init__(self, predictor, batch_sizes=DEFAULT_BATCH_SIZES, max_wait_s: float = 0.005):
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch sizes must be positive integers, got {batch_sizes!r}")
        self.predictor = predictor
        self.batch_sizes = tuple(sizes)
        self.max_wait_s = float(max_wait_s)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.compile_seconds = 0.0
        self.batches_run = 0
        self._incoming = 0
        self._lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> Engine:
        t0 = time.perf_counter()
        s = self.predictor.image_size
        for b in self.batch_sizes:
            _set_batch_size(self.predictor, b)
            self.predictor.predict_with_uncertainty(np.zeros((b, s, s, 3), np.uint8))
        self.compile_seconds = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._loop, name="sipak-serve-model", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests --------------------------------------------------------------------------

    @contextlib.contextmanager
    def incoming(self):
        """Marks a request on its way to `predict` (decoding): while any is, the worker waits
        up to max_wait_s for it before running a batch; with none, it never waits."""
        with self._lock:
            self._incoming += 1
        try:
            yield
        finally:
            with self._lock:
                self._incoming -= 1
                if self._incoming == 0:
                    self._queue.put(_WAKE)  # stop a batch waiting for requests that are gone

    def predict(self, images: np.ndarray) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if len(images) == 0:
            future.set_result((np.zeros((0, len(self.predictor.class_names))), None))
            return future
        self._submit(_Job("predict", np.asarray(images, np.uint8), future))
        return future

    def explain(self, image: np.ndarray, method: str, target: int) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_Job("explain", image[None], future, method, int(target)))
        return future

    def _submit(self, job: _Job) -> None:
        if not self.alive:
            raise RuntimeError("the model worker is not running")
        self._queue.put(job)

    # -- the worker ------------------------------------------------------------------------

    def _loop(self) -> None:
        carry = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is None:
                return
            if job is _WAKE:
                continue
            if job.kind == "explain":
                self._run_explain(job)
                continue
            jobs, carry = self._gather(job)
            self._run_predict(jobs)

    def _gather(self, first: _Job):
        """`first` plus the predict jobs already queued or, while requests are `incoming`,
        arriving within max_wait_s, up to the largest batch; a job of another kind (or the
        stop signal) is handed back as `carry`."""
        jobs, n = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while n < self.batch_sizes[-1]:
            left = deadline - time.monotonic()
            try:  # blocks (no polling: the event loop keeps the GIL) until a job or a wake-up
                if self._incoming and left > 0:
                    nxt = self._queue.get(timeout=left)
                else:
                    nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _WAKE:
                continue
            if nxt is None or nxt.kind != "predict":
                return jobs, nxt
            jobs.append(nxt)
            n += len(nxt.images)
        return jobs, None

    def _bucket(self, n: int) -> int:
        return next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])

    def _run_predict(self, jobs: list[_Job]) -> None:
        try:
            images = np.concatenate([j.images for j in jobs])
            probs, unc = [], []
            step = self.batch_sizes[-1]
            for start in range(0, len(images), step):
                chunk = images[start : start + step]
                _set_batch_size(self.predictor, self._bucket(len(chunk)))
                p, u = self.predictor.predict_with_uncertainty(chunk)
                probs.append(np.asarray(p))
                unc.append(None if u is None else np.asarray(u))
                self.batches_run += 1
            probs = np.concatenate(probs)
            unc = None if unc[0] is None else np.concatenate(unc)
        except Exception as e:  # noqa: BLE001 - fail these jobs, keep serving
            for j in jobs:
                j.future.set_exception(e)
            return
        at = 0
        for j in jobs:
            n = len(j.images)
            j.future.set_result((probs[at : at + n], None if unc is None else unc[at : at + n]))
            at += n

    def _run_explain(self, job: _Job) -> None:
        try:
            _set_batch_size(self.predictor, 1)
            maps = self.predictor.explain(job.images, job.method, np.asarray([job.target]))
            job.future.set_result(np.asarray(maps[0], np.float32))
        except Exception as e:  # noqa: BLE001 - fail this job, keep serving
            job.future.set_exception(e)

    # -- descriptions ----------------------------------------------------------------------

    def describe(self, method: str) -> list[dict]:
        """Where `method`'s maps are computed, one entry per member (module docstring)."""
        from sipak_jax import saliency

        m = saliency.METHODS[method]
        title = m.description.split(" (")[0]
        out = []
        for p in _members(self.predictor):
            size = p.image_size
            entry = {"method": method, "method_title": title, "input_size": size}
            if m.kind != "cam":
                entry.update(layer=None, stage=None, map_size=[size, size])
            else:
                stage = saliency.overlay_stage(p.model, size)
                h, w = saliency.stage_map_sizes(p.model, size)[stage]
                entry.update(
                    layer=saliency.layer_name(stage, p.model), stage=stage, map_size=[h, w]
                )
            out.append(entry)
        return out
