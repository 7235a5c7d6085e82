"""Training-time augmentation of image batches, inside jit, on the accelerator.

Ops act on NHWC batches of uint8 (or float on the 0-255 scale) with an independent random
draw per example. Exact ops (`rot90`, `flip_lr`, `flip_ud`, `flip`) keep the dtype; the
others return float32 on the 0-255 scale (no rounding between ops). `augment(...,
dtype=jnp.uint8)` rounds and clips at the end; `preprocessing.normalize` accepts either.

Config format: a tuple of strings, each an op name with optional Python-literal arguments in
call syntax (parsed with `ast`, never evaluated), applied in order::

    config.augment = ('rot90', 'flip_lr', 'flip_ud', 'rotate(180)')
    config.augment = ('rotate(max_angle=30, fill="reflect")', 'brightness(0.1)',
                      'contrast(0.8, 1.2)', 'hue(0.02)', 'random_resized_crop((0.35, 1.0))')

Ops (angles in degrees, counter-clockwise as `np.rot90` and `cv2.getRotationMatrix2D`):

- `rot90(p=1.0)`: with probability p, rotate by k*90, k uniform in {0, 1, 2, 3} (else
  k = 0). Square images only.
- `flip_lr(p=0.5)`, `flip_ud(p=0.5)`; `flip(p=0.5)` = both, independently.
- `rotate(max_angle=180, fill='border', p=1.0)`: angle uniform in [-max_angle, max_angle]
  about the image centre, bilinear. `fill` says what enters from outside the image:
  `'border'` (default) the image's border colour (per-channel median, lower middle value, of
  its outermost pixel ring: the slide background, so the rotated cell sits on the same
  background as the `pad` resize policy puts it on); `'reflect'` mirrors the image
  (OpenCV BORDER_REFLECT_101: no repeated edge pixel), which may copy neighbouring cells in;
  `'edge'` repeats the edge pixels (BORDER_REPLICATE); a number or RGB triple is a constant.
- `brightness(max_delta=0.1)`: adds delta*255, delta uniform in [-max_delta, max_delta].
- `contrast(lower=0.8, upper=1.2)`: (x - mean) * f + mean, per-image channel means, f uniform.
- `hue(max_delta=0.02)`: shifts the HSV hue by delta (fraction of the circle), as
  `tf.image.adjust_hue`.
- `saturation(lower=0.8, upper=1.2)`: scales HSV saturation.
- `random_resized_crop(scale=(0.35, 1.0), ratio=(3/4, 4/3))`: a box of area fraction `scale`
  and aspect ratio `ratio` (log-uniform), as torchvision's RandomResizedCrop, resized back
  to the input size (bilinear). The default minimum area is larger than torchvision's 0.08:
  a SIPaKMeD crop is one cell, and a box of 8% of it often misses the nucleus.

Colour ops clip to [0, 255]. Evaluation uses no augmentation (deterministic).

Speed: consecutive geometric ops (rot90, flips, rotate, random_resized_crop) are composed into
one affine map per example and the image is sampled once: one gather for a run of rot90/flips
(exact, uint8 kept), one bilinear sampling for a run with a rotation or crop (less blur than
resampling per op; out-of-image samples take the fill of the run's last rotate). Colour ops
are elementwise and fuse with `normalize` under jit.

New ops: decorate a factory with `@register('name')`; it returns either a pixel op
`op(rng, image[H, W, C]) -> image` or a `Geometric` (an output->source pixel map).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Op = Callable[[jax.Array, jax.Array], jax.Array]  # (rng, image [H, W, C]) -> image
_REGISTRY: dict[str, Callable[..., Op]] = {}


def register(name: str):
    """Registers an op factory under `name` for the config strings."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def available_ops() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def parse_op(spec: str) -> tuple[str, tuple, dict]:
    """'rotate(max_angle=30, fill="reflect")' -> ('rotate', (), {'max_angle': 30, ...})."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"An augmentation op must be a non-empty string, got {spec!r}.")
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"Cannot parse augmentation op {spec!r}: {e.msg}.") from None
    if isinstance(node, ast.Name):
        name, args, kwargs = node.id, (), {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise ValueError(
                f"Augmentation op {spec!r}: arguments must be Python literals "
                "(numbers, strings, tuples)."
            ) from None
        if any(k is None for k in kwargs):
            raise ValueError(f"Augmentation op {spec!r}: **kwargs are not supported.")
    else:
        raise ValueError(f"Augmentation op {spec!r} must look like 'name' or 'name(args)'.")
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown augmentation op {name!r} in {spec!r}; "
            f"available: {', '.join(available_ops())}."
        )
    return name, args, kwargs


@dataclasses.dataclass(frozen=True)
class Geometric:
    """A geometric op: `matrix(rng, h, w)` is the 3x3 map from output pixel (x, y, 1) to source
    pixel (pixel centres at integers). `exact` ops (rot90, flips) permute pixels; `fill` says
    what enters from outside the image (see the module docstring)."""

    matrix: Callable[[jax.Array, int, int], jax.Array]
    exact: bool
    fill: object = "edge"
    square: bool = False


@functools.lru_cache(maxsize=64)
def build_ops(specs: tuple[str, ...]) -> tuple:
    """Parses and instantiates a config's op strings (validating their arguments now)."""
    ops = []
    for spec in specs:
        name, args, kwargs = parse_op(spec)
        try:
            ops.append(_REGISTRY[name](*args, **kwargs))
        except TypeError as e:
            raise ValueError(f"Augmentation op {spec!r}: {e}.") from None
    return tuple(ops)


def _as_specs(ops) -> tuple[str, ...]:
    if isinstance(ops, str):
        return (ops,)
    return tuple(ops or ())


def _apply_geometric(keys, images, run: list[Geometric]):
    """One resampling for a run of consecutive geometric ops (their maps composed)."""
    b, h, w, _ = images.shape
    if any(g.square for g in run) and h != w:
        raise ValueError(f"rot90 needs square images, got {h}x{w}.")

    def one(key, image):
        m = jnp.eye(3, dtype=jnp.float32)
        for i, g in enumerate(run):  # out = g_k(...g_1(x)): source = M_1 @ ... @ M_k @ out
            # HIGHEST: no TF32 on GPUs, coordinates up to ~1000 need float32 accuracy.
            m = jnp.dot(m, g.matrix(jax.random.fold_in(key, i), h, w), precision="highest")
        ys, xs = jnp.meshgrid(
            jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
        )
        src_x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        src_y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        if all(g.exact for g in run):  # a pixel permutation: gather, exact, dtype kept
            sx = jnp.clip(jnp.round(src_x).astype(jnp.int32), 0, w - 1)
            sy = jnp.clip(jnp.round(src_y).astype(jnp.int32), 0, h - 1)
            return jnp.take(image.reshape(h * w, -1), sy * w + sx, axis=0, mode="clip").reshape(
                image.shape
            )
        fill = [g.fill for g in run if not g.exact][-1]
        return sample_bilinear(image, src_x, src_y, _fill_value(fill, image))

    return jax.vmap(one)(keys, images)


def augment(rng: jax.Array, images: jax.Array, ops: Sequence[str], dtype=None) -> jax.Array:
    """Applies the config's ops (see the module docstring) to a batch [B, H, W, C].

    Each example gets its own random draws, from `rng` split per example and per op. Runs of
    consecutive geometric ops are composed into one affine map and the image is sampled once
    (exactly, by a gather, when the run holds only rot90/flips; bilinearly otherwise). `dtype`
    None keeps what the ops produce (uint8 if they are all exact, else float32 on the 0-255
    scale); `jnp.uint8` rounds and clips. Works inside and outside jit (ops are static).
    """
    op_fns = build_ops(_as_specs(ops))
    if images.ndim != 4:
        raise ValueError(f"augment expects a batch [B, H, W, C], got shape {images.shape}.")
    x = images
    if op_fns:
        keys = jax.random.split(rng, images.shape[0])
        i, n = 0, len(op_fns)
        while i < n:
            op_keys = jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys)
            if isinstance(op_fns[i], Geometric):
                j = i
                while j < n and isinstance(op_fns[j], Geometric):
                    j += 1
                x = _apply_geometric(op_keys, x, list(op_fns[i:j]))
                i = j
            else:
                x = jax.vmap(op_fns[i])(op_keys, x)
                i += 1
    if dtype is not None and x.dtype != dtype:
        if jnp.issubdtype(dtype, jnp.integer):
            x = jnp.clip(jnp.round(x), 0, 255)
        x = x.astype(dtype)
    return x


def make_augment(ops: Sequence[str], dtype=None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`augment` with the ops bound (and validated now): `fn(rng, images)`, jit-able."""
    specs = _as_specs(ops)
    build_ops(specs)
    return lambda rng, images: augment(rng, images, specs, dtype)


# ---------------------------------------------------------------------------------------------
# Geometric ops: 3x3 maps from output to source pixel coordinates.


def _check_prob(p, name):
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name}: p must lie in [0, 1], got {p}.")


def _maybe(rng, p, m):
    """`m` with probability p, else the identity."""
    if p >= 1:
        return m
    return jnp.where(jax.random.uniform(rng) < p, m, jnp.eye(3, dtype=jnp.float32))


def _mat(rows):
    return jnp.asarray(rows, jnp.float32)


@register("rot90")
def rot90(p: float = 1.0) -> Geometric:
    _check_prob(p, "rot90")

    def matrix(rng, h, w):
        k_rng, p_rng = jax.random.split(rng)
        k = jax.random.randint(k_rng, (), 0, 4)
        if p < 1:
            k = jnp.where(jax.random.uniform(p_rng) < p, k, 0)
        s = w - 1  # np.rot90(x, 1)[y, x] = x[x, s - y]
        mats = jnp.stack(
            [
                _mat([[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
                _mat([[0, -1, s], [1, 0, 0], [0, 0, 1]]),
                _mat([[-1, 0, s], [0, -1, s], [0, 0, 1]]),
                _mat([[0, 1, 0], [-1, 0, s], [0, 0, 1]]),
            ]
        )
        return mats[k]

    return Geometric(matrix, exact=True, square=True)


def _flip(axis: int, p: float, name: str) -> Geometric:
    _check_prob(p, name)

    def matrix(rng, h, w):
        if axis == 1:
            m = _mat([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]])
        else:
            m = _mat([[1, 0, 0], [0, -1, h - 1], [0, 0, 1]])
        return _maybe(rng, p, m)

    return Geometric(matrix, exact=True)


@register("flip_lr")
def flip_lr(p: float = 0.5) -> Geometric:
    return _flip(1, p, "flip_lr")


@register("flip_ud")
def flip_ud(p: float = 0.5) -> Geometric:
    return _flip(0, p, "flip_ud")


@register("flip")
def flip(p: float = 0.5) -> Geometric:
    lr, ud = flip_lr(p), flip_ud(p)

    def matrix(rng, h, w):
        a, b = jax.random.split(rng)
        return jnp.dot(lr.matrix(a, h, w), ud.matrix(b, h, w), precision="highest")

    return Geometric(matrix, exact=True)


def border_colour(image: jax.Array) -> jax.Array:
    """Per-channel lower median of the outermost pixel ring of an image [H, W, C], in the
    image's dtype: inside jit, the same statistic as `sipak_jax.preprocessing.border_colour`
    (the numpy owner; tested equal)."""
    ring = jnp.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]], axis=0)
    return jnp.sort(ring, axis=0)[(ring.shape[0] - 1) // 2]


def _reflect101(i, n):
    """Index reflection without repeating the edge (dcb|abcd|cba), any integer i."""
    if n == 1:
        return jnp.zeros_like(i)
    period = 2 * (n - 1)
    i = jnp.mod(i, period)
    return jnp.where(i >= n, period - i, i)


def sample_bilinear(image: jax.Array, src_x: jax.Array, src_y: jax.Array, fill) -> jax.Array:
    """Bilinear samples of `image` [H, W, C] at float source coordinates (pixel centres at
    integers) of any shape S -> [*S, C] float32.

    `fill`: 'reflect' / 'edge' (index modes), or a colour [C] that every sample from outside
    the image takes (weighted per corner, as OpenCV's BORDER_CONSTANT). A colour is done by
    framing the image with one pixel of it and clamping: no per-corner masks.
    """
    h, w, c = image.shape
    if not isinstance(fill, str):
        fill = jnp.asarray(fill)
        keep = image.dtype == jnp.uint8 and jnp.issubdtype(fill.dtype, jnp.integer)
        dtype = image.dtype if keep else jnp.float32
        frame = np.ones((h + 2, w + 2, 1), bool)
        frame[1:-1, 1:-1] = False  # static: a select, not a scatter, under vmap
        padded = jnp.pad(image.astype(dtype), ((1, 1), (1, 1), (0, 0)))
        canvas = jnp.where(frame, fill.astype(dtype), padded)
        return sample_bilinear(canvas, src_x + 1.0, src_y + 1.0, "edge")
    flat = image.reshape(h * w, c)
    x0f, y0f = jnp.floor(src_x), jnp.floor(src_y)
    fx, fy = (src_x - x0f)[..., None], (src_y - y0f)[..., None]
    x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
    x1, y1 = x0 + 1, y0 + 1

    def corner(xi, yi):
        if fill == "reflect":
            xc, yc = _reflect101(xi, w), _reflect101(yi, h)
        else:  # edge
            xc, yc = jnp.clip(xi, 0, w - 1), jnp.clip(yi, 0, h - 1)
        return jnp.take(flat, yc * w + xc, axis=0, mode="clip").astype(jnp.float32)

    top = corner(x0, y0) * (1 - fx) + corner(x1, y0) * fx
    bottom = corner(x0, y1) * (1 - fx) + corner(x1, y1) * fx
    return top * (1 - fy) + bottom * fy


def _fill_value(fill, image):
    if isinstance(fill, str):
        if fill == "border":
            return border_colour(image)
        return fill
    if isinstance(fill, jax.Array):
        return jnp.broadcast_to(fill, (image.shape[-1],))
    values = np.broadcast_to(np.asarray(fill), (image.shape[-1],))
    if np.all(values == np.round(values)) and np.all((values >= 0) & (values <= 255)):
        return jnp.asarray(values.astype(np.uint8))
    return jnp.asarray(values.astype(np.float32))


def rotation_matrix(angle_deg, h: int, w: int) -> jax.Array:
    """Output -> source map of a counter-clockwise rotation by `angle_deg` about the image
    centre ((W-1)/2, (H-1)/2): the inverse of `cv2.getRotationMatrix2D(centre, angle, 1)`."""
    theta = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
    a, b = jnp.cos(theta), jnp.sin(theta)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    return jnp.stack(
        [
            jnp.stack([a, -b, cx - a * cx + b * cy]),
            jnp.stack([b, a, cy - b * cx - a * cy]),
            jnp.asarray([0.0, 0.0, 1.0]),
        ]
    )


def rotate_image(image: jax.Array, angle_deg, fill="border") -> jax.Array:
    """Rotates one image [H, W, C] by `angle_deg` counter-clockwise about its centre,
    bilinear: the same map as
    `cv2.warpAffine(image, cv2.getRotationMatrix2D(centre, angle, 1), (W, H))`. float32."""
    _check_fill(fill, "rotate_image")
    h, w, _ = image.shape
    m = rotation_matrix(angle_deg, h, w)
    ys, xs = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    src_x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    src_y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    return sample_bilinear(image, src_x, src_y, _fill_value(fill, image))


def _check_fill(fill, name):
    if isinstance(fill, str):
        if fill not in ("border", "reflect", "edge"):
            raise ValueError(
                f"{name}: fill must be 'border', 'reflect', 'edge' or a colour, got {fill!r}."
            )
    elif not isinstance(fill, jax.Array):
        try:
            vals = [float(v) for v in (fill if isinstance(fill, tuple | list) else [fill])]
        except (TypeError, ValueError):
            raise ValueError(f"{name}: fill must be a string or numbers, got {fill!r}.") from None
        if len(vals) not in (1, 3):
            raise ValueError(f"{name}: a constant fill is one number or three, got {fill!r}.")


@register("rotate")
def rotate(max_angle: float = 180.0, fill="border", p: float = 1.0) -> Geometric:
    _check_fill(fill, "rotate")
    _check_prob(p, "rotate")
    max_angle = float(max_angle)

    def matrix(rng, h, w):
        a_rng, p_rng = jax.random.split(rng)
        angle = jax.random.uniform(a_rng, (), jnp.float32, -max_angle, max_angle)
        angle = jnp.where(jax.random.uniform(p_rng) < p, angle, 0.0)
        return rotation_matrix(angle, h, w)

    return Geometric(matrix, exact=False, fill=fill)


@register("random_resized_crop")
def random_resized_crop(
    scale: Sequence[float] = (0.35, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> Geometric:
    lo, hi = float(scale[0]), float(scale[1])
    rlo, rhi = math.log(float(ratio[0])), math.log(float(ratio[1]))
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"random_resized_crop: need 0 < scale[0] <= scale[1] <= 1, got {scale}.")
    if not rlo <= rhi:
        raise ValueError(f"random_resized_crop: need ratio[0] <= ratio[1], got {ratio}.")

    def matrix(rng, h, w):
        k_area, k_ratio, k_x, k_y = jax.random.split(rng, 4)
        area = h * w * jax.random.uniform(k_area, (), jnp.float32, lo, hi)
        r = jnp.exp(jax.random.uniform(k_ratio, (), jnp.float32, rlo, rhi))
        bw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
        bh = jnp.clip(jnp.sqrt(area / r), 1.0, h)
        x0 = jax.random.uniform(k_x, (), jnp.float32) * (w - bw)
        y0 = jax.random.uniform(k_y, (), jnp.float32) * (h - bh)
        sx, sy = bw / w, bh / h  # output (x + 0.5) * sx - 0.5 + x0 (half-pixel centres)
        zero = jnp.zeros((), jnp.float32)
        return jnp.stack(
            [
                jnp.stack([sx, zero, x0 + 0.5 * sx - 0.5]),
                jnp.stack([zero, sy, y0 + 0.5 * sy - 0.5]),
                jnp.asarray([0.0, 0.0, 1.0]),
            ]
        )

    return Geometric(matrix, exact=False, fill="edge")


# ---------------------------------------------------------------------------------------------
# Colour ops (float32 out, clipped to [0, 255]).


def _f32(image):
    return image.astype(jnp.float32)


@register("brightness")
def brightness(max_delta: float = 0.1) -> Op:
    max_delta = float(max_delta)

    def op(rng, image):
        delta = jax.random.uniform(rng, (), jnp.float32, -max_delta, max_delta) * 255.0
        return jnp.clip(_f32(image) + delta, 0.0, 255.0)

    return op


@register("contrast")
def contrast(lower: float = 0.8, upper: float = 1.2) -> Op:
    if not 0 <= float(lower) <= float(upper):
        raise ValueError(f"contrast: need 0 <= lower <= upper, got {lower}, {upper}.")

    def op(rng, image):
        f = jax.random.uniform(rng, (), jnp.float32, float(lower), float(upper))
        x = _f32(image)
        mean = x.mean(axis=(0, 1), keepdims=True)
        return jnp.clip((x - mean) * f + mean, 0.0, 255.0)

    return op


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle), like colorsys."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = jnp.max(rgb, axis=-1)
    minc = jnp.min(rgb, axis=-1)
    v = maxc
    rng = maxc - minc
    safe_max = jnp.where(maxc > 0, maxc, 1.0)
    s = jnp.where(maxc > 0, rng / safe_max, 0.0)
    safe_rng = jnp.where(rng > 0, rng, 1.0)
    rc, gc, bc = (maxc - r) / safe_rng, (maxc - g) / safe_rng, (maxc - b) / safe_rng
    h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(rng > 0, jnp.mod(h / 6.0, 1.0), 0.0)
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Inverse of `rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h6 = jnp.mod(h, 1.0) * 6.0
    i = jnp.floor(h6)
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(jnp.int32) % 6
    r = jnp.choose(i, [v, q, p, p, t, v], mode="clip")
    g = jnp.choose(i, [t, v, v, q, p, p], mode="clip")
    b = jnp.choose(i, [p, p, t, v, v, q], mode="clip")
    return jnp.stack([r, g, b], axis=-1)


def adjust_hsv(image: jax.Array, hue_delta=0.0, saturation_factor=1.0) -> jax.Array:
    """Shifts hue by `hue_delta` (fraction of the circle) and scales saturation; 0-255 float."""
    hsv = rgb_to_hsv(_f32(image) / 255.0)
    h = jnp.mod(hsv[..., 0] + hue_delta, 1.0)
    s = jnp.clip(hsv[..., 1] * saturation_factor, 0.0, 1.0)
    out = hsv_to_rgb(jnp.stack([h, s, hsv[..., 2]], axis=-1)) * 255.0
    return jnp.clip(out, 0.0, 255.0)


@register("hue")
def hue(max_delta: float = 0.02) -> Op:
    if not 0 <= float(max_delta) <= 0.5:
        raise ValueError(f"hue: max_delta must lie in [0, 0.5], got {max_delta}.")

    def op(rng, image):
        delta = jax.random.uniform(rng, (), jnp.float32, -float(max_delta), float(max_delta))
        return adjust_hsv(image, hue_delta=delta)

    return op


@register("saturation")
def saturation(lower: float = 0.8, upper: float = 1.2) -> Op:
    if not 0 <= float(lower) <= float(upper):
        raise ValueError(f"saturation: need 0 <= lower <= upper, got {lower}, {upper}.")

    def op(rng, image):
        f = jax.random.uniform(rng, (), jnp.float32, float(lower), float(upper))
        return adjust_hsv(image, saturation_factor=f)

    return op
