"""Image operations the saliency methods share, in JAX: Gaussian blur as matrix products, map
resizing, and the 8 rotations/flips of a square image.

The blur follows `scipy.ndimage.gaussian_filter` (kernel radius `int(4 * sigma + 0.5)`,
normalised Gaussian weights) so that Blur IG reproduces PAIR's path, applied as
`M_h @ image @ M_w^T` with a precomputed matrix per axis (any radius, batched inside jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, weights) of scipy's 1-D Gaussian kernel."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / float(sigma) ** 2 * offsets.astype(np.float64) ** 2)
    return offsets, weights / weights.sum()


def blur_matrix(n: int, sigma: float, mode: str = "constant", truncate: float = 4.0) -> np.ndarray:
    """[n, n] float64 matrix that blurs a length-n signal: `(M @ v)[i] = sum_k w_k v[i + k]`.

    `mode` as scipy.ndimage: 'constant' (zeros outside) or 'reflect' (d c b a | a b c d).
    sigma 0 gives the identity (as PAIR's `gaussian_blur`)."""
    if sigma == 0:
        return np.eye(n)
    offsets, weights = gaussian_kernel1d(sigma, truncate)
    m = np.zeros((n, n))
    rows = np.arange(n)
    for off, w in zip(offsets, weights, strict=True):
        idx = rows + off
        if mode == "constant":
            ok = (idx >= 0) & (idx < n)
            np.add.at(m, (rows[ok], idx[ok]), w)
        elif mode == "reflect":
            j = np.mod(idx, 2 * n)
            j = np.where(j >= n, 2 * n - 1 - j, j)
            np.add.at(m, (rows, j), w)
        else:
            raise ValueError(f"blur mode must be 'constant' or 'reflect', got {mode!r}")
    return m


def blur_with(images: jax.Array, mh: jax.Array, mw: jax.Array) -> jax.Array:
    """Blur NHWC `images` with the row matrix `mh` [H,H] and column matrix `mw` [W,W]."""
    return jnp.einsum(
        "ih,bhwc,jw->bijc", mh, images, mw, precision=jax.lax.Precision.HIGHEST
    ).astype(images.dtype)


def gaussian_blur(
    images: jax.Array, sigma: float, mode: str = "reflect", radius: int | None = None
) -> jax.Array:
    """Gaussian blur of NHWC images over H and W (channels untouched); `radius` caps the
    kernel (default scipy's `int(4 * sigma + 0.5)`; 5 with sigma 5 is RISE's 11x11 kernel)."""
    _, h, w, _ = images.shape
    truncate = 4.0 if radius is None else (radius + 0.25) / sigma
    mh = jnp.asarray(blur_matrix(h, sigma, mode, truncate), jnp.float32)
    mw = jnp.asarray(blur_matrix(w, sigma, mode, truncate), jnp.float32)
    return blur_with(images, mh, mw)


def _mirror_coords(n_out: int, n_in: int) -> jax.Array:
    # Half-pixel centres: output pixel i maps to input coordinate (i + 0.5) * n_in / n_out - 0.5.
    return (jnp.arange(n_out, dtype=jnp.float32) + 0.5) * (n_in / n_out) - 0.5


def _corner_coords(n_out: int, n_in: int) -> jax.Array:
    # align_corners: output pixel i maps to input coordinate i * (n_in - 1) / (n_out - 1).
    if n_out == 1:
        return jnp.zeros((1,), jnp.float32)
    return jnp.arange(n_out, dtype=jnp.float32) * ((n_in - 1) / (n_out - 1))


def resize_maps(maps: jax.Array, size: tuple[int, int], method: str = "skimage") -> jax.Array:
    """Resize 2-D maps [B,h,w] to [B,H,W] bilinearly.

    'skimage': scikit-image's `resize(order=1, mode='reflect')` (PAIR's Grad-CAM), i.e.
      half-pixel coordinates with mirrored borders (matches it to about 5e-7).
    'bilinear': `jax.image.resize` (the cv2 / pytorch-grad-cam convention; edges clamp).
    'align_corners': corner pixel centres onto corner pixel centres (torch's
      `UpsamplingBilinear2d`, which pytorch-grad-cam's Score-CAM uses for its masks).
    """
    maps = jnp.asarray(maps, jnp.float32)
    b, h, w = maps.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return maps
    if method == "bilinear":
        return jax.image.resize(maps, (b, out_h, out_w), "bilinear")
    if method == "skimage":
        rows, cols, mode = _mirror_coords(out_h, h), _mirror_coords(out_w, w), "mirror"
    elif method == "align_corners":
        rows, cols, mode = _corner_coords(out_h, h), _corner_coords(out_w, w), "nearest"
    else:
        raise ValueError(
            f"resize method must be 'skimage', 'bilinear' or 'align_corners', got {method!r}"
        )
    rr, cc = jnp.meshgrid(rows, cols, indexing="ij")

    def one(m):
        return jax.scipy.ndimage.map_coordinates(m, [rr, cc], order=1, mode=mode)

    return jax.vmap(one)(maps)


# The dihedral group D4 of a square: (number of quarter turns, flip left-right first).
DIHEDRAL = tuple((k, f) for f in (False, True) for k in range(4))


def dihedral(x: jax.Array, k: int, flip: bool, axes=(1, 2)) -> jax.Array:
    """Apply element (k, flip) of D4 to the spatial `axes` of `x`."""
    if flip:
        x = jnp.flip(x, axis=axes[1])
    return jnp.rot90(x, k=k, axes=axes)


def dihedral_inverse(x: jax.Array, k: int, flip: bool, axes=(1, 2)) -> jax.Array:
    """Undo `dihedral(., k, flip)`."""
    x = jnp.rot90(x, k=-k, axes=axes)
    if flip:
        x = jnp.flip(x, axis=axes[1])
    return x
