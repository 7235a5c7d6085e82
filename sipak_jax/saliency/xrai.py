"""XRAI (Kapishnikov et al. 2019): rank image regions by the density of an attribution inside
them and paint each pixel with the gain of the region that first covered it.

Segments are Felzenszwalb over-segmentations at several scales (PAIR's settings: the image
rescaled to [-1, 1] and 224x224, scales 50..1200, sigma 0.8, min size 150, each segment
dilated by a disk of radius 5); this needs scikit-image, imported only here. The greedy
selection is PAIR's 'full' algorithm, vectorised: all candidate gains are one matrix product
per step.
"""

from __future__ import annotations

import numpy as np

FELZENSZWALB_SCALES = (50, 100, 150, 250, 500, 1200)
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_SIZE = (224, 224)
FELZENSZWALB_MIN_SIZE = 150


def segments(image: np.ndarray, dilation_radius: int = 5) -> np.ndarray:
    """Candidate regions [M,H,W] bool of one image [H,W,C] (PAIR's `_get_segments_felzenszwalb`
    settings)."""
    try:
        from skimage import segmentation
        from skimage.morphology import dilation, disk
        from skimage.transform import resize
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("XRAI's segmentation needs scikit-image: pip install scikit-image") from e
    im = np.asarray(image, np.float64)
    shape = im.shape[:2]
    span = im.max() - im.min()
    im = (im - im.min()) / (span if span > 0 else 1.0) * 2.0 - 1.0
    im = resize(
        im, FELZENSZWALB_SIZE, order=3, mode="constant", preserve_range=True, anti_aliasing=True
    )
    masks = []
    for scale in FELZENSZWALB_SCALES:
        seg = segmentation.felzenszwalb(
            im, scale=scale, sigma=FELZENSZWALB_SIGMA, min_size=FELZENSZWALB_MIN_SIZE
        )
        seg = resize(
            seg, shape, order=0, preserve_range=True, mode="constant", anti_aliasing=False
        ).astype(int)
        masks.extend(seg == label for label in range(seg.min(), seg.max() + 1))
    if dilation_radius:
        footprint = disk(dilation_radius)
        masks = [dilation(m, footprint=footprint) for m in masks]
    return np.stack(masks).astype(bool)


def xrai_from_attribution(
    attribution: np.ndarray,
    masks: np.ndarray,
    area_threshold: float = 1.0,
    min_pixel_diff: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """XRAI map [H,W] and region ranks [H,W] (1 = most important) from an attribution [H,W]
    or [H,W,C] (max over channels, as PAIR) and candidate masks [M,H,W]."""
    attr = np.asarray(attribution, np.float64)
    if attr.ndim == 3:
        attr = attr.max(axis=-1)
    masks = np.asarray(masks, bool)
    m, h, w = masks.shape
    if (h, w) != attr.shape:
        raise ValueError(f"XRAI masks {masks.shape[1:]} do not match the attribution {attr.shape}")
    flat = masks.reshape(m, -1).astype(np.float64)
    a = attr.reshape(-1)
    out = np.full(h * w, -np.inf)
    current = np.zeros(h * w, bool)
    remaining = np.ones(m, bool)
    trace = []
    area = 0.0
    while area <= area_threshold:
        free = (~current).astype(np.float64)
        counts = flat @ free
        sums = flat @ (a * free)
        remaining &= counts >= min_pixel_diff
        if not remaining.any():
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            gains = np.where(remaining, sums / np.maximum(counts, 1), -np.inf)
        best = int(np.argmax(gains))  # first best, as PAIR's strict '>' scan
        diff = masks[best].reshape(-1) & ~current
        trace.append((diff, gains[best]))
        current |= masks[best].reshape(-1)
        area = current.mean()
        out[diff] = gains[best]
        remaining[best] = False
    uncomputed = out == -np.inf
    if uncomputed.any():
        out[uncomputed] = a[uncomputed].mean()
    order = [d for d, _ in sorted(trace, key=lambda t: -t[1])]
    if uncomputed.any():
        order.append(uncomputed)
    ranks = np.zeros(h * w, int)
    for i, d in enumerate(order):
        ranks[d] = i + 1
    return out.reshape(h, w), ranks.reshape(h, w)
