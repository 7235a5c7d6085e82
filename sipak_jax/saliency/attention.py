"""Maps read from a model's own attention: attention rollout for ViTs, and the attention
head's weights for any model built with ``head="attention"``.

- ``rollout`` (Abnar & Zuidema 2020, "Quantifying attention flow in transformers"): each
  block's attention probabilities, fused over heads (mean by default; max or min as in
  jacobgil's vit-explain), with the residual connection added as the identity and rows
  renormalised (``0.5 A + 0.5 I`` for the mean), multiplied from the first block to the last;
  the class token's row over the patch tokens is the map [B,h,w]. Class-agnostic: it says
  where information flows to the class token, not what it says about one class.
  ``discard_ratio`` drops that share of the lowest fused attentions per block (never the
  class token's own column) before adding the identity (vit-explain's option; 0 = the paper).
- ``attention_head``: ``model.attention_map(x)``, the weights [B,h,w] (summing to 1) with
  which the attention-pooling head (``sipak_jax.models.heads``) pooled the last feature map
  or token grid: the model's own answer, also class-agnostic.

Both return raw maps at the token / feature-map resolution (``low_res``); ``explain``
resizes them to the input and min-max normalises them like a CAM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sipak_jax.saliency.core import ModelFunctions

HEAD_FUSIONS = ("mean", "max", "min")


def _require(fns: ModelFunctions, attribute: str, what: str):
    model = fns.model()
    if not hasattr(model, attribute):
        raise ValueError(
            f"{what} needs a model with {attribute}(x); {type(model).__name__} has none"
        )
    if attribute == "attention_map" and getattr(model, "attention_pool", None) is None:
        raise ValueError(
            f"{what} needs a model built with an attention head (model.head='attention'); "
            f"this {type(model).__name__} pools without one"
        )


def rollout_from_weights(weights, head_fusion: str = "mean", discard_ratio: float = 0.0):
    """Rollout [B, N] (the class token's row without its own entry) from attention
    probabilities [L, B, heads, 1+N, 1+N] (module docstring)."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    fuse = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion]
    w = fuse(jnp.asarray(weights, jnp.float32), axis=2)  # [L, B, T, T]
    _, b, t, _ = w.shape
    if discard_ratio > 0:
        flat = w.reshape(w.shape[0], b, t * t)
        k = int(t * t * discard_ratio)
        cut = jnp.sort(flat, axis=-1)[..., k - 1 : k] if k > 0 else None
        if cut is not None:
            keep = (flat > cut) | (jnp.arange(t * t) == 0)
            w = jnp.where(keep, flat, 0.0).reshape(w.shape)
    eye = jnp.eye(t, dtype=jnp.float32)
    a = w + eye
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    result = jnp.broadcast_to(eye, (b, t, t))
    for layer in a:  # result = A_L ... A_1
        result = jnp.einsum("bij,bjk->bik", layer, result)
    return result[:, 0, 1:]


def rollout(fns: ModelFunctions, x, head_fusion="mean", discard_ratio=0.0, state=None):
    """Attention rollout [B,h,w] of a ViT (one jitted call)."""
    _require(fns, "attention_weights", "attention rollout")
    fn = fns.cached(
        ("rollout", head_fusion, float(discard_ratio)),
        lambda: jax.jit(functools.partial(_rollout_pure, fns, head_fusion, float(discard_ratio))),
    )
    return fn(fns.state if state is None else state, jnp.asarray(x, jnp.float32))


def _rollout_pure(fns, head_fusion, discard_ratio, state, x):
    model = fns.model(state)
    flows = rollout_from_weights(model.attention_weights(x), head_fusion, discard_ratio)
    return flows.reshape(x.shape[0], *model.grid)


def attention_head_map(fns: ModelFunctions, x, state=None):
    """The attention head's weights [B,h,w] (one jitted call)."""
    _require(fns, "attention_map", "the attention head's map")
    fn = fns.cached(
        ("attention_head",), lambda: jax.jit(functools.partial(_attention_head_pure, fns))
    )
    return fn(fns.state if state is None else state, jnp.asarray(x, jnp.float32))


def _attention_head_pure(fns, state, x):
    return fns.model(state).attention_map(x).astype(jnp.float32)
