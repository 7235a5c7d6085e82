"""Saliency maps for the ResNet classifiers: one entry point, `explain`, over a registry of
batched, jitted methods (`METHODS`).

    from sipak_jax import saliency
    result = saliency.explain(model, images, "gradcam")      # images: normalised NHWC float
    result.maps        # [B,H,W] float32 raw map at the input resolution
    result.normalized  # [B,H,W] in [0, 1] (never NaN, also for an all-negative map)
    result.target      # [B] explained class (predicted unless given)

Methods (see each module): the CAM family (`cam.py`), gradients and SmoothGrad
(`gradients.py`), Integrated Gradients and Blur IG (`integrated.py`), XRAI (`xrai.py`),
occlusion (`occlusion.py`), attention rollout for ViTs and the attention head's own map
(`attention.py`: 'rollout', 'attention_head'). Overlays: `overlay.py`; evaluation: `metrics.py`.

ViTs: the CAM family works on the patch-token grid (`ViT.features(x, stage)`; the class token
the later blocks need travels as `features_with_context`'s context, see `core.py`).

The CAM family works at any stage (`stage=1..4`); `overlay_stage(model, image_size)` is the
stage overlays use (the deepest whose map is at least `MIN_MAP_SIZE` x `MIN_MAP_SIZE`, see
`cam.py`), `stage_map_sizes` gives each stage's map size and `layer_name` its layer's name.

How a [B,H,W,C] attribution becomes a 2-D map: signed attributions (IG, Blur IG, gradient x
input) are summed over channels; gradient magnitudes (vanilla gradient, SmoothGrad mean) sum
|g| over channels (PAIR's `VisualizeImageGrayscale`); squared SmoothGrad and VarGrad are summed.
Normalisation: CAMs are min-max scaled (pytorch-grad-cam); other maps keep their positive part
divided by its 99th percentile and clipped to [0, 1] (PAIR's visualisation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sipak_jax.saliency import (
    attention,
    cam,
    gradients,
    imageops,
    integrated,
    occlusion,
    xrai,
)
from sipak_jax.saliency.cam import MIN_MAP_SIZE, layer_name, overlay_stage, stage_map_sizes
from sipak_jax.saliency.core import ModelFunctions, as_functions, check_score


@dataclasses.dataclass
class Explanation:
    """What `explain` returns (arrays are numpy)."""

    method: str
    maps: np.ndarray  # [B,H,W] raw map at the input resolution
    normalized: np.ndarray  # [B,H,W] in [0, 1]
    target: np.ndarray  # [B] explained class
    attributions: np.ndarray | None = None  # [B,H,W,C] per-channel, where the method has them
    low_res: np.ndarray | None = None  # [B,h,w] raw CAM at the stage's resolution
    info: dict = dataclasses.field(default_factory=dict)  # e.g. IG's completeness gap


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: `fn(fns, x, target, score, stage, **options) -> dict` with keys
    'maps' [B,H,W] (or 'low_res' [B,h,w]) and optionally 'attributions', 'info'."""

    name: str
    fn: Callable
    kind: str  # 'cam' (min-max normalised) or 'attribution'
    description: str


def _reduce(attr, how):
    if how == "sum":
        return jnp.sum(attr, axis=-1)
    if how == "abs_sum":
        return jnp.sum(jnp.abs(attr), axis=-1)
    raise ValueError(how)


def _cam_method(kind):
    def run(fns, x, target, score, stage, **opts):
        if kind in cam.GRADIENT_CAMS:
            low = cam.gradient_cam(fns, kind, x, target, score, stage, **opts)
        elif kind == "eigencam":
            low = cam.eigen_cam(fns, x, target, score, stage, **opts)
        else:
            low = cam.score_cam(fns, x, target, score, stage, **opts)
        return {"low_res": low}

    return run


def _vanilla(fns, x, target, score, stage, **opts):
    a = gradients.vanilla_gradient(fns, x, target, score, **opts)
    return {"attributions": a, "maps": _reduce(a, "abs_sum")}


def _gxi(fns, x, target, score, stage, **opts):
    a = gradients.gradient_x_input(fns, x, target, score, **opts)
    return {"attributions": a, "maps": _reduce(a, "sum")}


def _smoothgrad(kind):
    def run(fns, x, target, score, stage, **opts):
        a = gradients.smoothgrad(fns, x, target, score, kind=kind, **opts)
        return {"attributions": a, "maps": _reduce(a, "abs_sum" if kind == "mean" else "sum")}

    return run


def _ig(fns, x, target, score, stage, *, adaptive=False, **opts):
    if adaptive:
        a, info = integrated.integrated_gradients_adaptive(fns, x, target, score, **opts)
    else:
        a, info = integrated.integrated_gradients(fns, x, target, score, **opts)
    return {"attributions": a, "maps": _reduce(a, "sum"), "info": info}


def _blur_ig(fns, x, target, score, stage, **opts):
    a = integrated.blur_ig(fns, x, target, score, **opts)
    return {"attributions": a, "maps": _reduce(a, "sum")}


def _xrai(fns, x, target, score, stage, *, ig_steps=64, baseline="black_white", spec=None, **kw):
    """XRAI on our IG (averaged over black and white baselines when `spec` is known, else
    PAIR's min/max-of-image baselines)."""
    xa = jnp.asarray(x, jnp.float32)
    if baseline == "black_white" and spec is None:
        lo = jnp.min(xa, axis=(1, 2, 3), keepdims=True)
        hi = jnp.max(xa, axis=(1, 2, 3), keepdims=True)
        baseline = [jnp.broadcast_to(lo, xa.shape), jnp.broadcast_to(hi, xa.shape)]
    a, info = integrated.integrated_gradients(
        fns, xa, target, score, baseline=baseline, steps=ig_steps, spec=spec
    )
    a_np = np.asarray(a)
    x_np = np.asarray(xa)
    maps = np.stack(
        [
            xrai.xrai_from_attribution(a_np[i], xrai.segments(x_np[i]), **kw)[0]
            for i in range(x_np.shape[0])
        ]
    ).astype(np.float32)
    return {"attributions": a, "maps": jnp.asarray(maps), "info": info}


def _occlusion(fns, x, target, score, stage, **opts):
    return {"maps": occlusion.occlusion(fns, x, target, score, **opts)}


def _rollout(fns, x, target, score, stage, **opts):
    return {"low_res": attention.rollout(fns, x, **opts)}


def _attention_head(fns, x, target, score, stage, **opts):
    return {"low_res": attention.attention_head_map(fns, x, **opts)}


METHODS: dict[str, Method] = {}


def register(name, fn, kind, description):
    METHODS[name] = Method(name, fn, kind, description)


for _k, _d in [
    ("gradcam", "Grad-CAM (Selvaraju et al. 2017)"),
    ("gradcam++", "Grad-CAM++ (Chattopadhay et al. 2018)"),
    ("hirescam", "HiResCAM (Draelos & Carin 2020)"),
    ("xgradcam", "XGrad-CAM (Fu et al. 2020)"),
    ("layercam", "LayerCAM (Jiang et al. 2021)"),
    ("eigencam", "EigenCAM (Muhammad & Yeasin 2020), class-agnostic"),
    ("scorecam", "Score-CAM (Wang et al. 2020), one forward pass per channel"),
]:
    register(_k, _cam_method(_k), "cam", _d)
register("gradient", _vanilla, "attribution", "vanilla gradient (Simonyan et al. 2014)")
register("gradient_x_input", _gxi, "attribution", "gradient x input")
register("smoothgrad", _smoothgrad("mean"), "attribution", "SmoothGrad, mean gradient")
register("smoothgrad_sq", _smoothgrad("squared"), "attribution", "SmoothGrad, squared (PAIR)")
register("vargrad", _smoothgrad("vargrad"), "attribution", "VarGrad (Adebayo et al. 2018)")
register("ig", _ig, "attribution", "Integrated Gradients (Sundararajan et al. 2017)")
register("blur_ig", _blur_ig, "attribution", "Blur IG (Xu et al. 2020)")
register("xrai", _xrai, "attribution", "XRAI on IG (Kapishnikov et al. 2019)")
register("occlusion", _occlusion, "attribution", "occlusion (Zeiler & Fergus 2014)")
register(
    "rollout", _rollout, "cam", "attention rollout (Abnar & Zuidema 2020), ViT, class-agnostic"
)
register(
    "attention_head", _attention_head, "cam", "the attention head's own weights, class-agnostic"
)

# Options that only some methods take; `explain` passes them where they apply.
_TAKES_SPEC = ("ig", "xrai")


def normalize_maps(maps, kind: str = "attribution", percentile: float = 99.0) -> np.ndarray:
    """[B,H,W] maps scaled to [0, 1]; a constant or all-negative map gives zeros, never NaN.

    kind 'cam': min-max per map. kind 'attribution': the positive part divided by its
    `percentile`-th percentile, clipped to [0, 1]."""
    m = jnp.asarray(maps, jnp.float32)
    if kind == "cam":
        lo = jnp.min(m, axis=(1, 2), keepdims=True)
        span = jnp.max(m, axis=(1, 2), keepdims=True) - lo
        out = jnp.where(span > 0, (m - lo) / jnp.where(span > 0, span, 1.0), 0.0)
    else:
        pos = jnp.maximum(m, 0.0)
        top = jnp.percentile(pos.reshape(pos.shape[0], -1), percentile, axis=1)
        top = jnp.where(top > 0, top, jnp.max(pos, axis=(1, 2)))
        top = top[:, None, None]
        out = jnp.where(top > 0, jnp.clip(pos / jnp.where(top > 0, top, 1.0), 0.0, 1.0), 0.0)
    return np.asarray(out)


def explain(
    model,
    images,
    method: str = "gradcam",
    target=None,
    score: str = "logit",
    stage: int = 4,
    *,
    average_transforms: bool = False,
    resize: str = "skimage",
    spec: dict | None = None,
    **options,
) -> Explanation:
    """Explain `model`'s score for `images` (normalised NHWC float, [B,H,W,C] or [H,W,C]).

    model: a `sipak_jax.models.ResNet` (switched to eval mode) or a `ModelFunctions` (reuses
      its compiled functions across calls).
    method: a key of `METHODS`.
    target: None (each image's predicted class), an int, or [B] ints.
    score: 'logit' (default) or 'probability'.
    stage: the ResNet stage (1..4) whose activations the CAM family uses.
    average_transforms: average the map over the 8 rotations and flips of the (square) image,
      each explaining the same target (cells have no orientation).
    resize: how CAMs are upsampled to the input ('skimage' as PAIR, or 'bilinear').
    spec: the model DIR's `preprocessing` dict (needed by IG's black/white baselines).
    options: the method's own options (IG `steps`, `baseline`, `rule`, `adaptive`,
      SmoothGrad `n_samples`, occlusion `size`/`stride`, ...).
    """
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; available: {sorted(METHODS)}")
    check_score(score)
    fns = as_functions(model)
    x = jnp.asarray(images, jnp.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must be [B,H,W,C] or [H,W,C], got shape {x.shape}")
    tgt = fns.resolve_target(x, target)
    m = METHODS[method]
    if method in _TAKES_SPEC and spec is not None:
        options = dict(options, spec=spec)
    size = x.shape[1:3]

    def run(xx):
        out = m.fn(fns, xx, tgt, score, stage, **options)
        if "low_res" in out:
            out["maps"] = imageops.resize_maps(out["low_res"], size, resize)
        return out

    if not average_transforms:
        out = run(x)
    else:
        if size[0] != size[1]:
            raise ValueError(f"average_transforms needs square images, got {size}")
        outs = []
        for k, flip in imageops.DIHEDRAL:
            o = run(imageops.dihedral(x, k, flip))
            o = {
                key: imageops.dihedral_inverse(v, k, flip)
                for key, v in o.items()
                if key in ("maps", "attributions", "low_res")
            }
            outs.append(o)
        out = {key: sum(o[key] for o in outs) / len(outs) for key in outs[0]}
    maps = np.asarray(out["maps"], np.float32)
    info = {
        k: (np.asarray(v) if isinstance(v, jax.Array) else v)
        for k, v in out.get("info", {}).items()
    }
    return Explanation(
        method=method,
        maps=maps,
        normalized=normalize_maps(maps, m.kind),
        target=np.asarray(tgt),
        attributions=None if out.get("attributions") is None else np.asarray(out["attributions"]),
        low_res=None if out.get("low_res") is None else np.asarray(out["low_res"]),
        info=info,
    )


__all__ = [
    "METHODS",
    "MIN_MAP_SIZE",
    "Explanation",
    "Method",
    "ModelFunctions",
    "explain",
    "layer_name",
    "normalize_maps",
    "overlay_stage",
    "register",
    "stage_map_sizes",
]
