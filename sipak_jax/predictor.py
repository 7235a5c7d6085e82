"""One model DIR as a function: uint8 images -> logits, probabilities, saliency maps.

`Predictor(model, metadata, batch_size)` is what `predict`, `explain`, `evaluate`, the server
and `sipak_jax.ensemble` run: the model's weights in one jitted function (compiled once: the
last batch is padded to `batch_size`), its normalisation inside that function, softmax at the
model's temperature. `sipak_jax.ensemble.EnsemblePredictor` has the same interface for
several members; `ensemble.load_predictor(spec)` gives either.
"""

from __future__ import annotations

import numpy as np

from tfds_sipakmed.taxonomy import Taxonomy

DEFAULT_BATCH_SIZE = 32

__all__ = ["DEFAULT_BATCH_SIZE", "Predictor"]


class Predictor:
    """A model and its metadata as one jitted function: uint8 images -> logits / probabilities.

    `metadata` is a model DIR's `model_io.ModelMetadata` (its `preprocessing`, `taxonomy` and
    `temperature`). Batches are padded to `batch_size` so the function compiles once.
    `members`: `[path]` when the model DIR's path was given, else `[]`.
    """

    def __init__(self, model, metadata, batch_size: int = DEFAULT_BATCH_SIZE, *, path=None):
        import jax
        from flax import nnx

        from sipak_jax import preprocessing

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        metadata.validate()
        if metadata.taxonomy is None:
            raise ValueError("the model is headless (model.num_classes 0): it cannot classify.")
        spec = metadata.preprocessing
        self.spec = dict(spec)
        self.image_size = int(spec["image_size"])
        self.taxonomy: Taxonomy = metadata.taxonomy
        self.class_names = self.taxonomy.class_names
        self.temperature = float(metadata.temperature)
        self.batch_size = int(batch_size)
        self.members = [str(path)] if path is not None else []  # the model DIR, when known
        self.model = model
        model.eval()
        graphdef, state = nnx.split(model)
        self._state = state

        def forward(state, images_uint8):
            m = nnx.merge(graphdef, state)
            return m(preprocessing.normalize(images_uint8, spec)).astype("float32")

        self._forward = jax.jit(forward)
        self._saliency_fns = None

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 logits [N, K], in padded batches of `batch_size`."""
        images = np.asarray(images)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, {s}, {s}, 3], got {images.dtype} {images.shape}"
            )
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, s, s, 3), np.uint8)
                chunk = np.concatenate([chunk, pad])
            out.append(np.asarray(self._forward(self._state, chunk))[:n])
        k = len(self.class_names)
        logits = np.concatenate(out) if out else np.zeros((0, k), np.float32)
        if logits.shape[1] != k:
            raise ValueError(f"the model outputs {logits.shape[1]} logits for {k} class names")
        return logits

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """softmax(logits / temperature), float64 [N, K]."""
        from sipak_jax.calibration import softmax

        return softmax(self.logits(images), self.temperature)

    def predict_with_uncertainty(self, images: np.ndarray) -> tuple[np.ndarray, None]:
        """(probabilities [N, K], None): one model has no members to disagree (the ensemble's
        `predict_with_uncertainty` gives their mutual information)."""
        return self.probabilities(images), None

    def explain(self, images: np.ndarray, method: str, targets: np.ndarray) -> np.ndarray:
        """Saliency maps in [0, 1], [N, S, S], of `targets` (class indices), by `method`; the
        CAM family at `saliency.overlay_stage` (the deepest stage with a map of at least 7x7)."""
        import jax.numpy as jnp

        from sipak_jax import preprocessing, saliency

        if self._saliency_fns is None:
            self._saliency_fns = saliency.ModelFunctions(self.model)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = np.asarray(images[start : start + self.batch_size])
            tgt = np.asarray(targets[start : start + self.batch_size], np.int32)
            n = len(chunk)
            if n < self.batch_size:
                pad = self.batch_size - n
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
                tgt = np.concatenate([tgt, np.zeros(pad, np.int32)])
            x = preprocessing.normalize(jnp.asarray(chunk), self.spec)
            stage = saliency.overlay_stage(self._saliency_fns, self.image_size)
            result = saliency.explain(
                self._saliency_fns, x, method, target=tgt, stage=stage, spec=self.spec
            )
            out.append(np.asarray(result.normalized)[:n])
        return np.concatenate(out) if out else np.zeros((0, self.image_size, self.image_size))
