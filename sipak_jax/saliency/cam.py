"""Class activation maps at any ResNet stage: Grad-CAM, Grad-CAM++, HiResCAM, XGradCAM,
LayerCAM, EigenCAM and Score-CAM, batched and jitted.

Each returns the raw map [B,h,w] at the stage's resolution, after the ReLU (pytorch-grad-cam's
and PAIR's convention), unnormalised. `explain` resizes it to the input and normalises it.

At the last stage of a ResNet (global average pooling + Dense) the gradient with respect to
the activations is `W[:, c] / (h*w)` at every position, so Grad-CAM, HiResCAM and XGradCAM
all equal CAM, `relu(A @ W[:, c]) / (h*w)` (up to a positive factor for XGradCAM); they differ
at inner stages.

Which stage a map resolves a cell at depends on the input size: `overlay_stage` picks the
deepest stage whose map is at least `MIN_MAP_SIZE` cells on each side (what every overlay a
person looks at uses: training's TensorBoard overlays, the run's report artifacts, predict).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sipak_jax.models.resnet import NUM_STAGES
from sipak_jax.saliency import imageops
from sipak_jax.saliency.core import ModelFunctions, as_functions, select_score
from sipak_jax.saliency.gradients import map_batches

GRADIENT_CAMS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")
CAMS = GRADIENT_CAMS + ("eigencam", "scorecam")
_EPS = 1e-7  # XGradCAM's denominator (pytorch-grad-cam's)
# Grad-CAM++'s denominator term: pytorch-grad-cam's 1e-6. Not negligible: at a logit's gradient
# scale (about 1e-3 per position at the last stage) eps 1e-7 or 0 moved the maps of a random
# ResNet by 10-20% of their maximum (tests/test_cam_reference.py).
_PLUSPLUS_EPS = 1e-6

# The overlay stage rule: the deepest stage whose map is at least this many cells on each side.
# 7 is the last stage of a ResNet at 224 px (the Grad-CAM paper's 7x7), so the main model keeps
# the textbook layer4; a 64 px input (the demo) gets layer2's 8x8 map, where layer4's 2x2 map
# would put every cell's evidence in the same quadrant.
MIN_MAP_SIZE = 7


def layer_name(stage: int, model=None) -> str:
    """Where `stage`'s map is taken: the model's own `stage_name(stage)` when it has one (a
    ViT: "blocks 1-3", ...), else the ResNet attribute holding the stage's blocks
    (`layer1`..`layer4`, torchvision's names; `stem` for 0). `model`: a model or a
    `ModelFunctions`."""
    if isinstance(model, ModelFunctions):
        model = model.model()
    if model is not None and hasattr(model, "stage_name"):
        return model.stage_name(stage)
    return "stem" if stage == 0 else f"layer{stage}"


def stage_map_sizes(model, image_size: int) -> dict[int, tuple[int, int]]:
    """{stage: (h, w)} of each stage's activations (1..4) for a square `image_size` input,
    from shapes only (`jax.eval_shape`: nothing is computed)."""
    fns = as_functions(model)
    x = jax.ShapeDtypeStruct((1, int(image_size), int(image_size), 3), jnp.float32)
    out = {}
    for stage in range(1, NUM_STAGES + 1):
        shape = jax.eval_shape(functools.partial(fns.features_pure, stage=stage), fns.state, x)
        out[stage] = (int(shape.shape[1]), int(shape.shape[2]))
    return out


def overlay_stage(model, image_size: int, min_size: int = MIN_MAP_SIZE) -> int:
    """The stage the overlays use: the deepest whose map is at least `min_size` x `min_size`
    for an `image_size` input (stage 1 when none is). ResNet at 224 px: 4 (7x7); at 64 px: 2
    (8x8). Cached on a `ModelFunctions` (the training loop asks every epoch)."""
    fns = as_functions(model)

    def pick():
        sizes = stage_map_sizes(fns, image_size)
        fit = [s for s, (h, w) in sizes.items() if min(h, w) >= min_size]
        return max(fit) if fit else 1

    return fns.cached(("overlay_stage", int(image_size), int(min_size)), pick)


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
        # Chattopadhay et al. 2018 (eq. 19 with the ReLU of eq. 7), as pytorch-grad-cam.
        g2 = grads**2
        g3 = g2 * grads
        sum_acts = jnp.sum(acts, axis=(1, 2))
        aij = g2 / (2 * g2 + sum_acts[:, None, None, :] * g3 + _PLUSPLUS_EPS)
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
    upsampled (corner-aligned bilinear) and min-max scaled to [0, 1], masks the input; the
    weights are the softmax over channels of the target's score on the masked inputs. C
    forward passes per image."""
    fn = fns.cached(
        ("scorecam", score, stage, int(batch_size)),
        lambda: jax.jit(functools.partial(_score_cam_pure, fns, score, stage, int(batch_size))),
    )
    return fn(fns.state if state is None else state, jnp.asarray(x, jnp.float32), target)


def _score_cam_pure(fns, score, stage, batch_size, state, x, target):
    acts = fns.features_pure(state, x, stage).astype(jnp.float32)
    b, h, w, c = acts.shape
    size = x.shape[1:3]
    # [B*C, h, w] channel maps -> input size (corner-aligned bilinear, as torch's
    # UpsamplingBilinear2d in pytorch-grad-cam), min-max per channel (a constant channel: 0).
    chan = jnp.transpose(acts, (0, 3, 1, 2)).reshape(b * c, h, w)
    up = imageops.resize_maps(chan, size, "align_corners")
    lo = jnp.min(up, axis=(1, 2), keepdims=True)
    hi = jnp.max(up, axis=(1, 2), keepdims=True)
    up = (up - lo) / (hi - lo + 1e-8)
    up = up.reshape(b, c, *size)

    def scores_of(idx):
        bi, ci = idx // c, idx % c
        masked = x[bi] * up[bi, ci][..., None]
        return select_score(fns.logits_pure(state, masked), target[bi], score)

    flat = map_batches(scores_of, jnp.arange(b * c), batch_size).reshape(b, c)
    weights = jax.nn.softmax(flat, axis=-1)
    return jnp.maximum(jnp.einsum("bhwc,bc->bhw", acts, weights), 0.0)
