"""Class activation maps at any ResNet stage: Grad-CAM, Grad-CAM++, HiResCAM, XGradCAM,
LayerCAM, EigenCAM and Score-CAM, batched and jitted.

Each returns the raw map [B,h,w] at the stage's resolution, after the ReLU (pytorch-grad-cam's
and PAIR's convention), unnormalised. `explain` resizes it to the input and normalises it.

At the last stage of a ResNet (global average pooling + Dense) the gradient with respect to
the activations is `W[:, c] / (h*w)` at every position, so Grad-CAM, HiResCAM and XGradCAM
all equal CAM, `relu(A @ W[:, c]) / (h*w)` (up to a positive factor for XGradCAM); they differ
at inner stages.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sipak_jax.saliency import imageops
from sipak_jax.saliency.core import ModelFunctions, select_score
from sipak_jax.saliency.gradients import map_batches

GRADIENT_CAMS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")
CAMS = GRADIENT_CAMS + ("eigencam", "scorecam")
_EPS = 1e-7


def cam_from_gradients(kind: str, acts: jax.Array, grads: jax.Array) -> jax.Array:
    """The CAM [B,h,w] of `kind` from activations and their gradients [B,h,w,C]."""
    acts = acts.astype(jnp.float32)
    grads = grads.astype(jnp.float32)
    if kind == "gradcam":
        weights = jnp.mean(grads, axis=(1, 2))
        cam = jnp.einsum("bhwc,bc->bhw", acts, weights)
    elif kind == "hirescam":
        cam = jnp.sum(grads * acts, axis=-1)
    elif kind == "xgradcam":
        denom = jnp.sum(acts, axis=(1, 2))
        weights = jnp.sum(grads * acts, axis=(1, 2)) / (denom + _EPS)
        cam = jnp.einsum("bhwc,bc->bhw", acts, weights)
    elif kind == "gradcam++":
        # Chattopadhay et al. 2018, as pytorch-grad-cam computes it.
        g2 = grads**2
        g3 = g2 * grads
        sum_acts = jnp.sum(acts, axis=(1, 2))
        aij = g2 / (2 * g2 + sum_acts[:, None, None, :] * g3 + _EPS)
        aij = jnp.where(grads != 0, aij, 0.0)
        weights = jnp.sum(jnp.maximum(grads, 0) * aij, axis=(1, 2))
        cam = jnp.einsum("bhwc,bc->bhw", acts, weights)
    elif kind == "layercam":
        cam = jnp.sum(jnp.maximum(grads, 0) * acts, axis=-1)
    else:
        raise ValueError(f"unknown gradient CAM {kind!r}; one of {GRADIENT_CAMS}")
    return jnp.maximum(cam, 0.0)


def gradient_cam(fns: ModelFunctions, kind, x, target, score="logit", stage=4, state=None):
    """Grad-CAM family map [B,h,w] at `stage` (one jitted call)."""
    fn = fns.cached(
        ("cam", kind, score, stage),
        lambda: jax.jit(functools.partial(_gradient_cam_pure, fns, kind, score, stage)),
    )
    return fn(fns.state if state is None else state, jnp.asarray(x, jnp.float32), target)


def _gradient_cam_pure(fns, kind, score, stage, state, x, target):
    acts, grads, _ = fns.feature_gradients_pure(state, x, target, score, stage)
    return cam_from_gradients(kind, acts, grads)


def eigen_cam(fns: ModelFunctions, x, target=None, score="logit", stage=4, state=None):
    """EigenCAM (Muhammad & Yeasin 2020) [B,h,w]: the activations projected on their first
    principal component (class-agnostic). The component's sign is chosen so that the map
    correlates positively with the channel sum, then ReLU."""
    fn = fns.cached(
        ("eigencam", stage), lambda: jax.jit(functools.partial(_eigen_cam_pure, fns, stage))
    )
    return fn(fns.state if state is None else state, jnp.asarray(x, jnp.float32))


def _eigen_cam_pure(fns, stage, state, x):
    acts = fns.features_pure(state, x, stage).astype(jnp.float32)
    b, h, w, c = acts.shape
    flat = acts.reshape(b, h * w, c)
    centred = flat - jnp.mean(flat, axis=1, keepdims=True)
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
    proj = jnp.einsum("bnc,bc->bn", centred, vt[:, 0, :])
    total = jnp.sum(flat, axis=-1)
    sign = jnp.sign(jnp.sum(proj * (total - jnp.mean(total, axis=1, keepdims=True)), axis=1))
    sign = jnp.where(sign == 0, 1.0, sign)
    return jnp.maximum(proj * sign[:, None], 0.0).reshape(b, h, w)


def score_cam(fns: ModelFunctions, x, target, score="logit", stage=4, batch_size=64, state=None):
    """Score-CAM (Wang et al. 2020) [B,h,w], as pytorch-grad-cam: each channel's activation,
    upsampled and min-max scaled to [0, 1], masks the input; the weights are the softmax over
    channels of the target's score on the masked inputs. C forward passes per image."""
    fn = fns.cached(
        ("scorecam", score, stage, int(batch_size)),
        lambda: jax.jit(functools.partial(_score_cam_pure, fns, score, stage, int(batch_size))),
    )
    return fn(fns.state if state is None else state, jnp.asarray(x, jnp.float32), target)


def _score_cam_pure(fns, score, stage, batch_size, state, x, target):
    acts = fns.features_pure(state, x, stage).astype(jnp.float32)
    b, h, w, c = acts.shape
    size = x.shape[1:3]
    # [B*C, h, w] channel maps -> input size, min-max per channel.
    chan = jnp.transpose(acts, (0, 3, 1, 2)).reshape(b * c, h, w)
    up = imageops.resize_maps(chan, size, "bilinear")
    lo = jnp.min(up, axis=(1, 2), keepdims=True)
    hi = jnp.max(up, axis=(1, 2), keepdims=True)
    up = (up - lo) / jnp.maximum(hi - lo, 1e-8)
    up = up.reshape(b, c, *size)

    def scores_of(idx):
        bi, ci = idx // c, idx % c
        masked = x[bi] * up[bi, ci][..., None]
        return select_score(fns.logits_pure(state, masked), target[bi], score)

    flat = map_batches(scores_of, jnp.arange(b * c), batch_size).reshape(b, c)
    weights = jax.nn.softmax(flat, axis=-1)
    return jnp.maximum(jnp.einsum("bhwc,bc->bhw", acts, weights), 0.0)
