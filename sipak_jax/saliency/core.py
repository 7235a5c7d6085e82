"""The model seen as pure, jitted functions: what every saliency method differentiates.

A `ModelFunctions` splits an NNX model once (`nnx.split`) into a graph definition and a state
and builds `jax.jit`-compiled pure functions of (state, images, ...), cached by their static
arguments (stage, score, ...). `nnx.jit` would walk the object graph on every call; this does
not. BatchNorm runs in inference mode: the model is switched to `eval()` before splitting (in
train mode one image's gradient depends on its batch neighbours).

The *score* explained is the target class's logit (`score='logit'`, the Grad-CAM paper,
pytorch-grad-cam and Captum) or its softmax probability (`score='probability'`, PAIR's
examples). The *target* is an int32 [B] array of class indices; `None` means the predicted
class of each clean image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SCORES = ("logit", "probability")


def check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return score


def select_score(logits: jax.Array, target: jax.Array, score: str) -> jax.Array:
    """The explained score [B] of `target` [B] from `logits` [B, K]."""
    if score == "probability":
        values = jax.nn.softmax(logits, axis=-1)
    else:
        values = logits
    return jnp.take_along_axis(values, target[:, None].astype(jnp.int32), axis=-1)[:, 0]


class ModelFunctions:
    """Pure jitted functions of one model (split once, compiled once per static signature).

    The model is not modified: the functions use an eval-mode view of it.

    `state` is the model's full state (parameters and BatchNorm statistics); a metric that
    randomises layers passes a modified state to the same compiled functions.
    """

    def __init__(self, model: nnx.Module):
        if not hasattr(model, "features") or not hasattr(model, "classify"):
            raise TypeError(
                "saliency needs a model with features(x, stage) and classify(h, stage) "
                f"(sipak_jax.models.ResNet); got {type(model).__name__}"
            )
        # A view of the model in eval mode; the caller's model (maybe training) keeps its mode.
        view = nnx.merge(*nnx.split(model))
        view.eval()
        self.graphdef, self.state = nnx.split(view)
        self._cache: dict = {}

    def update_state(self, model_or_state) -> ModelFunctions:
        """Take the current weights of `model_or_state` (same architecture), keeping every
        compiled function: what a training loop calls each epoch before `overlay_batch`."""
        state = model_or_state
        if isinstance(model_or_state, nnx.Module):
            state = nnx.state(model_or_state)
        self.state = state
        return self

    def model(self, state=None) -> nnx.Module:
        """A model object with `state` (default: the original state)."""
        return nnx.merge(self.graphdef, self.state if state is None else state)

    def _jit(self, key, builder):
        fn = self._cache.get(key)
        if fn is None:
            fn = jax.jit(builder())
            self._cache[key] = fn
        return fn

    # -- pure building blocks (traced inside other jitted functions) -------------------------
    def logits_pure(self, state, x):
        model = nnx.merge(self.graphdef, state)
        return model(x)

    def features_pure(self, state, x, stage):
        model = nnx.merge(self.graphdef, state)
        return model.features(x, stage)

    def features_with_context_pure(self, state, x, stage):
        """(activations [B,h,w,C], context): the context is what `classify` needs besides
        the activations (a ViT's class token, `features_with_context`); None for a CNN."""
        model = nnx.merge(self.graphdef, state)
        if hasattr(model, "features_with_context"):
            return model.features_with_context(x, stage)
        return model.features(x, stage), None

    def classify_pure(self, state, h, stage, context=None):
        model = nnx.merge(self.graphdef, state)
        if context is None:
            return model.classify(h, stage)
        return model.classify(h, stage, context)

    def score_pure(self, state, x, target, score):
        return select_score(self.logits_pure(state, x), target, score)

    def input_gradients_pure(self, state, x, target, score):
        """(d score / d x [B,H,W,C], score [B]); each image's score depends on it alone."""

        def total(xx):
            s = self.score_pure(state, xx, target, score)
            return jnp.sum(s), s

        grads, scores = jax.grad(total, has_aux=True)(x)
        return grads, scores

    def feature_gradients_pure(self, state, x, target, score, stage):
        """(activations A [B,h,w,C] of `stage`, d score / d A, score [B])."""
        acts, context = self.features_with_context_pure(state, x, stage)

        def total(h):
            s = select_score(self.classify_pure(state, h, stage, context), target, score)
            return jnp.sum(s), s

        grads, scores = jax.grad(total, has_aux=True)(acts)
        return acts, grads, scores

    # -- jitted entry points -----------------------------------------------------------------
    def logits(self, x, state=None):
        fn = self._jit(("logits",), lambda: self.logits_pure)
        return fn(self.state if state is None else state, jnp.asarray(x, jnp.float32))

    def predict(self, x, state=None) -> jax.Array:
        """Predicted class [B] (int32)."""
        return jnp.argmax(self.logits(x, state), axis=-1).astype(jnp.int32)

    def scores(self, x, target, score="logit", state=None):
        fn = self._jit(("scores", score), lambda: functools.partial(self._scores, score=score))
        return fn(self.state if state is None else state, jnp.asarray(x, jnp.float32), target)

    def _scores(self, state, x, target, *, score):
        return self.score_pure(state, x, target, score)

    def input_gradients(self, x, target, score="logit", state=None):
        fn = self._jit(
            ("input_gradients", score),
            lambda: functools.partial(self._input_gradients, score=score),
        )
        return fn(self.state if state is None else state, jnp.asarray(x, jnp.float32), target)

    def _input_gradients(self, state, x, target, *, score):
        return self.input_gradients_pure(state, x, target, score)

    def feature_gradients(self, x, target, score="logit", stage=4, state=None):
        fn = self._jit(
            ("feature_gradients", score, stage),
            lambda: functools.partial(self._feature_gradients, score=score, stage=stage),
        )
        return fn(self.state if state is None else state, jnp.asarray(x, jnp.float32), target)

    def _feature_gradients(self, state, x, target, *, score, stage):
        return self.feature_gradients_pure(state, x, target, score, stage)

    def cached(self, key, builder):
        """`builder()` (a jitted function, constants) built once and cached under `key`."""
        value = self._cache.get(key)
        if value is None:
            value = builder()
            self._cache[key] = value
        return value

    def resolve_target(self, x, target, state=None) -> jax.Array:
        """`target` as an int32 [B] array; None: each image's predicted class."""
        b = x.shape[0]
        if target is None:
            return self.predict(x, state)
        t = np.asarray(target)
        if t.ndim == 0:
            t = np.full((b,), int(t))
        if t.shape != (b,):
            raise ValueError(f"target must be an int or {b} ints (one per image), got {t.shape}")
        k = self.num_classes
        if t.min() < 0 or t.max() >= k:
            raise ValueError(f"target class out of range 0..{k - 1}: {t.tolist()}")
        return jnp.asarray(t, jnp.int32)

    @property
    def num_classes(self) -> int:
        return int(self.model().num_classes)


def as_functions(model_or_fns) -> ModelFunctions:
    """Accept a model or an existing `ModelFunctions` (reuse its compiled functions)."""
    if isinstance(model_or_fns, ModelFunctions):
        return model_or_fns
    return ModelFunctions(model_or_fns)
