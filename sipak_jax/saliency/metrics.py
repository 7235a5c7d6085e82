"""How good is a saliency map? Sanity, faithfulness and localisation on cell masks.

- `ig_completeness`: IG's completeness gap |sum(attributions) - (f(x) - f(baseline))| / |...|.
- `randomization_sanity` (Adebayo et al. 2018): re-initialise the model's layers from the top
  down (head, stage 4, ..., stem) and report the Spearman rank correlation of each map with the
  map of the trained model; a faithful method decorrelates.
- `deletion_insertion` (Petsiuk et al. 2018): delete the most salient pixels first (to 0 in
  input space) / insert them into a blurred image (kernel 11, sigma 5); softmax probability of
  the target after each step; normalised trapezoid AUC (deletion: lower is better; insertion:
  higher).
- `road` (Rong et al. 2022): remove the most (MoRF) or least (LeRF) relevant fraction of the
  pixels and fill them by noisy linear imputation (each removed pixel the weighted mean of
  its 8 neighbours, then Gaussian noise); mean target probability over the fractions.
- `cell_masks` / `localisation`: share of the positive saliency inside the nucleus, a
  perinuclear ring, the rest of the cytoplasm and the background, built from the crop-level
  contours mapped into the input frame (`mask_regions`: the same from crop-level masks, e.g.
  Herlev's segmentation images); and the pointing game (where the map's maximum falls). Each
  beside its chance level: the region's share of the image area.
"""

from __future__ import annotations

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sipak_jax import preprocessing
from sipak_jax.saliency import imageops, integrated
from sipak_jax.saliency.core import ModelFunctions, as_functions
from sipak_jax.saliency.gradients import map_batches

REGIONS = ("nucleus", "ring", "cytoplasm", "background")
# Top-down cascade for the ResNets of sipak_jax.models (attribute names as torchvision).
RESNET_CASCADE = (
    ("head", ("fc",)),
    ("stage4", ("layer4",)),
    ("stage3", ("layer3",)),
    ("stage2", ("layer2",)),
    ("stage1", ("layer1",)),
    ("stem", ("conv1", "bn1")),
)
# ConvNeXts (sipak_jax.models.convnext): each stage with the downsampling layer before it.
CONVNEXT_CASCADE = (
    ("head", ("fc", "attention_pool", "norm")),
    ("stage4", ("stage4", "down4")),
    ("stage3", ("stage3", "down3")),
    ("stage2", ("stage2", "down2")),
    ("stage1", ("stage1",)),
    ("stem", ("stem_conv", "stem_norm")),
)
# ViTs (sipak_jax.models.vit): the head, then every block at once (one top-level attribute),
# then the embeddings.
VIT_CASCADE = (
    ("head", ("fc", "attention_pool", "norm")),
    ("blocks", ("blocks",)),
    ("embeddings", ("patch_embed", "cls_token", "pos_embed")),
)


def cascade_for(model) -> tuple:
    """The randomisation cascade of a model: `VIT_CASCADE` for a ViT, `CONVNEXT_CASCADE` for
    a ConvNeXt, else the ResNet one (with an attention head, its pool is randomised with
    `fc`)."""
    if hasattr(model, "attention_weights"):
        return VIT_CASCADE
    if hasattr(model, "stem_conv"):
        return CONVNEXT_CASCADE
    if getattr(model, "attention_pool", None) is not None:
        return (("head", ("fc", "attention_pool")), *RESNET_CASCADE[1:])
    return RESNET_CASCADE


# ---------------------------------------------------------------- completeness -------------
def ig_completeness(model, x, target=None, **ig_options) -> np.ndarray:
    """IG's completeness gap [B] (relative), for the given IG options."""
    fns = as_functions(model)
    t = fns.resolve_target(jnp.asarray(x, jnp.float32), target)
    _, info = integrated.integrated_gradients(fns, x, t, **ig_options)
    return np.asarray(info["gap"])


# ---------------------------------------------------------------- randomisation ------------
def randomized_state(fns: ModelFunctions, prefixes, seed: int = 0, state=None):
    """A copy of the model state whose parameters under the top-level attributes `prefixes`
    are re-initialised (kernels He-normal, biases and BatchNorm shifts 0, BatchNorm and
    LayerNorm scales 1, ConvNeXt layer scales 1 (not their 1e-6 start, which would switch the
    randomised blocks off instead of randomising them); BatchNorm statistics kept)."""
    # Fresh Variable objects: updating a model merged from `state` itself would write into it.
    source = fns.state if state is None else state
    model = fns.model(jax.tree.map(lambda a: a, source))
    params = nnx.state(model, nnx.Param)
    key = jax.random.key(seed)
    counter = [0]

    def reinit(path, leaf):
        first = path[0].key if hasattr(path[0], "key") else str(path[0])
        if first not in prefixes:
            return leaf
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        counter[0] += 1
        k = jax.random.fold_in(key, counter[0])
        if "kernel" in names:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jax.random.normal(k, leaf.shape, leaf.dtype) * np.sqrt(2.0 / fan_in)
        if "scale" in names or "layer_scale" in names:
            return jnp.ones_like(leaf)
        return jnp.zeros_like(leaf)

    nnx.update(model, jax.tree_util.tree_map_with_path(reinit, params))
    return nnx.state(model)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (flattened); 0 when either is constant."""
    from scipy.stats import spearmanr

    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def randomization_sanity(
    model,
    x,
    method: str,
    target=None,
    cascade=None,
    absolute: bool = True,
    seed: int = 0,
    **options,
) -> dict[str, np.ndarray]:
    """{level: Spearman correlation [B]} between each image's map from the trained model and
    from the model with the layers of `cascade` re-initialised cumulatively down to `level`.
    The target stays the trained model's prediction (or the given one). `absolute` compares
    |map| (as Adebayo et al.). `cascade` None: `cascade_for` the model."""
    fns = as_functions(model)
    cascade = cascade_for(fns.model()) if cascade is None else cascade
    x = jnp.asarray(x, jnp.float32)
    tgt = fns.resolve_target(x, target)
    base = _maps_with_state(fns, x, method, tgt, fns.state, **options)
    out = {}
    prefixes: list[str] = []
    original = fns.state
    try:
        for level, names in cascade:
            prefixes.extend(names)
            fns.state = randomized_state(fns, tuple(prefixes), seed=seed, state=original)
            maps = _maps_with_state(fns, x, method, tgt, fns.state, **options)
            f = np.abs if absolute else (lambda v: v)
            out[level] = np.array([spearman(f(base[i]), f(maps[i])) for i in range(x.shape[0])])
    finally:
        fns.state = original
    return out


def _maps_with_state(fns, x, method, tgt, state, **options):
    from sipak_jax import saliency

    saved = fns.state
    fns.state = state
    try:
        return saliency.explain(fns, x, method, target=np.asarray(tgt), **options).maps
    finally:
        fns.state = saved


# ---------------------------------------------------------------- deletion / insertion -----
def _pixel_ranks(maps):
    """Rank [B,H,W] of each pixel (0 = most salient; ties by position)."""
    b, h, w = maps.shape
    order = np.argsort(-np.asarray(maps, np.float64).reshape(b, -1), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(h * w)[None].repeat(b, 0), axis=1)
    return ranks.reshape(b, h, w)


def auc(curve: np.ndarray) -> np.ndarray:
    """Normalised trapezoid area under curves [..., n+1] sampled at evenly spaced steps."""
    c = np.asarray(curve, np.float64)
    n = c.shape[-1] - 1
    return (c.sum(-1) - (c[..., 0] + c[..., -1]) / 2) / n


def deletion_insertion(
    model,
    x,
    maps,
    target=None,
    *,
    steps: int = 32,
    batch_size: int = 64,
    blur_sigma: float = 5.0,
    blur_size: int = 11,
) -> dict[str, np.ndarray]:
    """{'deletion': AUC [B], 'insertion': AUC [B], 'deletion_curve', 'insertion_curve'
    [B, steps+1]}: target probability as the most salient pixels are deleted (set to 0) or
    inserted into the blurred image."""
    fns = as_functions(model)
    x = jnp.asarray(x, jnp.float32)
    tgt = fns.resolve_target(x, target)
    ranks = jnp.asarray(_pixel_ranks(maps))
    b, h, w, _ = x.shape
    blurred = imageops.gaussian_blur(x, blur_sigma, mode="reflect", radius=blur_size // 2)
    counts = jnp.asarray(np.round(np.linspace(0, h * w, steps + 1)).astype(np.int32))
    fn = fns.cached(
        ("deletion_insertion", steps, batch_size),
        lambda: jax.jit(functools.partial(_del_ins_pure, fns, batch_size)),
    )
    dele, ins = fn(fns.state, x, blurred, ranks, tgt, counts)
    dele, ins = np.asarray(dele), np.asarray(ins)
    return {
        "deletion": auc(dele),
        "insertion": auc(ins),
        "deletion_curve": dele,
        "insertion_curve": ins,
    }


def _del_ins_pure(fns, batch_size, state, x, blurred, ranks, target, counts):
    b = x.shape[0]
    n = counts.shape[0]
    img = jnp.repeat(jnp.arange(b), n)
    cnt = jnp.tile(counts, b)

    def probs(batch):
        bi, k = batch
        keep = (ranks[bi] < k[:, None, None])[..., None]
        deleted = jnp.where(keep, 0.0, x[bi])
        inserted = jnp.where(keep, x[bi], blurred[bi])
        both = jnp.concatenate([deleted, inserted])
        p = jax.nn.softmax(fns.logits_pure(state, both), axis=-1)
        t = jnp.concatenate([target[bi], target[bi]])
        pt = jnp.take_along_axis(p, t[:, None], axis=-1)[:, 0]
        m = bi.shape[0]
        return pt[:m], pt[m:]

    d, i = map_batches(probs, (img, cnt), max(1, batch_size // 2))
    return d.reshape(b, n), i.reshape(b, n)


# ---------------------------------------------------------------- ROAD ---------------------
def noisy_linear_impute(image: np.ndarray, removed: np.ndarray, noise: float = 0.01, rng=None):
    """Fill `removed` pixels [H,W] of `image` [H,W,C]: each removed pixel equals the weighted
    mean of its 8 neighbours (1/6 edge, 1/12 corner, as ROAD), solved as one sparse linear
    system; then add Gaussian noise of std `noise` to the filled pixels."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import spsolve

    img = np.asarray(image, np.float64)
    h, w, c = img.shape
    removed = np.asarray(removed, bool)
    if not removed.any():
        return img.astype(np.float32)
    idx = -np.ones((h, w), np.int64)
    ys, xs = np.nonzero(removed)
    n = len(ys)
    idx[ys, xs] = np.arange(n)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    for dy, dx, wt in [
        (-1, 0, 1 / 6),
        (1, 0, 1 / 6),
        (0, -1, 1 / 6),
        (0, 1, 1 / 6),
        (-1, -1, 1 / 12),
        (-1, 1, 1 / 12),
        (1, -1, 1 / 12),
        (1, 1, 1 / 12),
    ]:
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diag[ok] += wt
        nyo, nxo, src = ny[ok], nx[ok], np.nonzero(ok)[0]
        nb = idx[nyo, nxo]
        unknown = nb >= 0
        rows.append(src[unknown])
        cols.append(nb[unknown])
        vals.append(-wt * np.ones(unknown.sum()))
        rhs[src[~unknown]] += wt * img[nyo[~unknown], nxo[~unknown]]
    data = np.concatenate([diag] + vals)
    a = csr_matrix((data, (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    sol = spsolve(a.tocsc(), rhs)
    sol = sol.reshape(n, c)
    rng = np.random.default_rng(0) if rng is None else rng
    out = img.copy()
    out[ys, xs] = sol + rng.normal(0.0, noise, sol.shape)
    return out.astype(np.float32)


def road(
    model,
    x,
    maps,
    target=None,
    *,
    fractions=(0.1, 0.3, 0.5, 0.7, 0.9),
    noise: float = 0.01,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """{'morf': mean target probability [B] after removing the most relevant fractions
    (lower: more faithful), 'lerf': the same for the least relevant (higher: more faithful),
    'morf_curve'/'lerf_curve' [B, len(fractions)]}."""
    fns = as_functions(model)
    x = np.asarray(x, np.float32)
    tgt = fns.resolve_target(jnp.asarray(x), target)
    ranks = _pixel_ranks(maps)
    b, h, w, _ = x.shape
    rng = np.random.default_rng(seed)
    curves = {}
    for order in ("morf", "lerf"):
        imgs = []
        for i in range(b):
            r = ranks[i] if order == "morf" else (h * w - 1 - ranks[i])
            for f in fractions:
                imgs.append(noisy_linear_impute(x[i], r < round(f * h * w), noise, rng))
        logits = np.asarray(fns.logits(np.stack(imgs)))
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        t = np.repeat(np.asarray(tgt), len(fractions))
        curves[order] = p[np.arange(len(t)), t].reshape(b, len(fractions))
    return {
        "morf": curves["morf"].mean(1),
        "lerf": curves["lerf"].mean(1),
        "morf_curve": curves["morf"],
        "lerf_curve": curves["lerf"],
    }


# ---------------------------------------------------------------- localisation -------------
def _fill(points_xy, size):
    mask = np.zeros((size, size), np.uint8)
    pts = np.asarray(points_xy, np.float64).reshape(-1, 2)
    if len(pts) >= 3:
        shift = 4  # sub-pixel vertices
        cv2.fillPoly(mask, [np.rint(pts * (1 << shift)).astype(np.int32)], 1, cv2.LINE_8, shift)
    return mask.astype(bool)


def cell_masks(
    nucleus_xy,
    cytoplasm_xy,
    crop_shape,
    size: int,
    policy: str = "pad",
    ring_fraction: float = 0.5,
) -> dict[str, np.ndarray]:
    """Region masks [size, size] bool in the input frame from crop-level contours (x, y).

    nucleus: inside the nucleus contour. ring: the perinuclear band within `ring_fraction` of
    the nucleus's equivalent radius around it (inside the cell). cytoplasm: the rest of the
    cell. background: outside the cell (and nucleus). The four partition the frame."""
    nuc = _fill(preprocessing.crop_to_frame(nucleus_xy, crop_shape, size, policy), size)
    cell = _fill(preprocessing.crop_to_frame(cytoplasm_xy, crop_shape, size, policy), size)
    return _regions(nuc, cell | nuc, ring_fraction)


def _mask_to_frame(mask: np.ndarray, size: int, policy: str) -> np.ndarray:
    """A crop-level bool mask [h, w] in the `size` x `size` input frame (nearest neighbour,
    the transform `crop_to_frame` applies to points)."""
    sx, sy, ox, oy = preprocessing.frame_transform(mask.shape, size, policy)
    affine = np.float32([[sx, 0, (ox + 0.5) * sx - 0.5], [0, sy, (oy + 0.5) * sy - 0.5]])
    out = cv2.warpAffine(
        np.asarray(mask, np.uint8), affine, (size, size), flags=cv2.INTER_NEAREST, borderValue=0
    )
    return out.astype(bool)


def mask_regions(
    nucleus_mask, cytoplasm_mask, size: int, policy: str = "pad", ring_fraction: float = 0.5
) -> dict[str, np.ndarray]:
    """`cell_masks`'s regions from crop-level bool masks [h, w] (Herlev's segmentation images)
    instead of contours; `cytoplasm_mask` may or may not include the nucleus."""
    nucleus_mask = np.asarray(nucleus_mask, bool)
    nuc = _mask_to_frame(nucleus_mask, size, policy)
    cell = _mask_to_frame(np.asarray(cytoplasm_mask, bool) | nucleus_mask, size, policy)
    return _regions(nuc, cell | nuc, ring_fraction)


def _regions(nuc: np.ndarray, cell: np.ndarray, ring_fraction: float) -> dict[str, np.ndarray]:
    """nucleus, perinuclear ring, rest of the cytoplasm, background from frame masks."""
    radius = np.sqrt(nuc.sum() / np.pi)
    width = max(1, int(round(ring_fraction * radius)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    grown = cv2.dilate(nuc.astype(np.uint8), kernel).astype(bool)
    ring = grown & cell & ~nuc
    cyto = cell & ~nuc & ~ring
    return {"nucleus": nuc, "ring": ring, "cytoplasm": cyto, "background": ~cell}


def localisation(saliency_map: np.ndarray, masks: dict[str, np.ndarray]) -> dict:
    """Share of the positive saliency in each region, its chance level (area fraction) and the
    pointing game (the region holding the map's maximum)."""
    m = np.asarray(saliency_map, np.float64)
    pos = np.maximum(m, 0.0)
    total = pos.sum()
    peak = np.unravel_index(int(np.argmax(m)), m.shape)
    out = {}
    for name in REGIONS:
        mask = masks[name]
        out[name] = {
            "share": float(pos[mask].sum() / total) if total > 0 else 0.0,
            "chance": float(mask.mean()),
            "pointing": float(bool(mask[peak])),
        }
    return out


def summarize_localisation(records: list[dict], labels, class_names) -> dict:
    """Mean share / chance / pointing-game hit rate per class and overall, from
    `localisation` records with their labels."""
    labels = np.asarray(labels)
    out = {}
    groups = [("all", np.ones(len(records), bool))]
    groups += [(n, labels == i) for i, n in enumerate(class_names)]
    for name, sel in groups:
        if not sel.any():
            continue
        chosen = [r for r, s in zip(records, sel, strict=True) if s]
        out[name] = {
            region: {
                k: float(np.mean([r[region][k] for r in chosen]))
                for k in ("share", "chance", "pointing")
            }
            for region in REGIONS
        }
        out[name]["n"] = int(sel.sum())
    return out
