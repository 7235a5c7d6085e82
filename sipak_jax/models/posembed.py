"""Resampling a ViT's learned position embeddings to another patch grid (numpy, at load time).

A ViT trained at 224 px with 16 px patches has a 14 x 14 grid of position embeddings (plus
the class token's, which is never resampled). At another image size the grid is resampled
bicubically, exactly as the reference libraries do it when they load weights:

- ``"timm"``: ``timm.layers.resample_abs_pos_embed`` (``F.interpolate(mode="bicubic",
  antialias=True, align_corners=False)``): PIL-style antialiased bicubic, Keys' a = -0.5,
  weights renormalised at the borders, support widened by the scale when shrinking;
- ``"torchvision"``: ``torchvision.models.vision_transformer.interpolate_embeddings``
  (``F.interpolate(mode="bicubic", align_corners=True)``): a = -0.75, border pixels
  replicated, corners aligned.

Each is a separable linear map (one [new, old] matrix per axis), so the result equals
PyTorch's to float rounding (tests/test_convert_vit.py checks both against PyTorch).
"""

from __future__ import annotations

import math

import numpy as np

STYLES = ("timm", "torchvision")


def _keys(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``x``."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _matrix_aligned(n_in: int, n_out: int) -> np.ndarray:
    """torch bicubic, align_corners=True, no antialias: [n_out, n_in]."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        src = i * scale
        base = math.floor(src)
        t = src - base
        for k, w in zip(
            range(-1, 3), _keys(np.array([t + 1, t, 1 - t, 2 - t]), -0.75), strict=True
        ):
            m[i, min(max(base + k, 0), n_in - 1)] += w
    return m


def _matrix_antialiased(n_in: int, n_out: int) -> np.ndarray:
    """torch bicubic, antialias=True, align_corners=False (PIL's filter): [n_out, n_in]."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _keys((j - center + 0.5) * invscale, -0.5)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


def resample_grid(grid: np.ndarray, new_hw: tuple[int, int], style: str) -> np.ndarray:
    """[h, w, C] -> [new_h, new_w, C] as ``style``'s reference library resamples it."""
    if style not in STYLES:
        raise ValueError(f"position-embedding resampling style must be one of {STYLES}")
    h, w, _ = grid.shape
    make = _matrix_antialiased if style == "timm" else _matrix_aligned
    mh, mw = make(h, new_hw[0]), make(w, new_hw[1])
    out = np.einsum("ih,hwc,jw->ijc", mh, grid.astype(np.float64), mw)
    return out.astype(grid.dtype)


def resample_pos_embed(
    pos: np.ndarray, new_hw: tuple[int, int], style: str, num_prefix_tokens: int = 1
) -> np.ndarray:
    """A [1, prefix + h*w, C] position embedding (square old grid) for a ``new_hw`` grid; the
    prefix (class token) rows are kept as they are. Unchanged when the grid already fits."""
    pos = np.asarray(pos)
    n = pos.shape[1] - num_prefix_tokens
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embedding of {n} patch tokens is not a square grid")
    if (side, side) == tuple(new_hw):
        return pos
    prefix, grid = pos[:, :num_prefix_tokens], pos[0, num_prefix_tokens:]
    new = resample_grid(grid.reshape(side, side, -1), tuple(new_hw), style)
    return np.concatenate([prefix, new.reshape(1, -1, pos.shape[-1])], axis=1)
