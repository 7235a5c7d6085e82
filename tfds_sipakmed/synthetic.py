"""A synthetic SIPaKMeD: a procedural stand-in that writes the real archives' on-disk tree.

The real data cannot be downloaded on the project's machines, so the loading code (the TFDS
builder, the fold assignment, the input pipeline) is exercised on this stand-in, which has the
same files and the same quirks:

```
OUT/im_<Class>/NNN.bmp                 cluster image (24-bit BMP), with unannotated cells too
OUT/im_<Class>/NNN_cytKK.dat           whole-cell contour, cluster coordinates, first vertex
OUT/im_<Class>/NNN_nucKK.dat           nucleus contour, cluster coordinates  repeated at the end
OUT/im_<Class>/CROPPED/NNN_KK.bmp      the crop: contour bbox + 10 px, clipped to the cluster
OUT/im_<Class>/CROPPED/NNN_KK_cyt.dat  the same contours in crop coordinates (not closed)
OUT/im_<Class>/CROPPED/NNN_KK_nuc.dat
```

`.dat` files hold one `x,y` vertex per line (x the column, y the row), numbers written with five
significant digits like the real files (`1146.5,489`), LF endings. About 1.2% of the cells get a
bad annotation (an empty nucleus file, or a nucleus drawn outside its cell), as in the real data.

Each class follows the morphology table of the dataset notes (cell and nucleus area, N/C ratio,
shape, nucleus look, perinuclear halo for Koilocytotic, dense keratinised cytoplasm and tight
clusters for Dyskeratotic, eccentric nucleus and vacuoles for Metaplastic, a vesicular nucleus
for Parabasal, a tiny pyknotic nucleus in a large flat polygon for Superficial-Intermediate).
Background, stain colours, illumination, focus and noise are drawn per cluster image
independently of the class, so only morphology carries the label: every class draws its
cytoplasm colour from the same two per-cluster stain colours (a "cyanophilic" and an
"eosinophilic" one, each of random hue), and nuclei share one per-cluster hematoxylin colour.

Lengths are the real ones times `scale` (default 0.5, so areas are a quarter), except the crop
margin, which stays 10 px as in the real data. Cluster images are only as large as their cells
need (a few hundred pixels, not 2048x1536). The output is a pure function of
(cells_per_class, seed, scale).

Needs only numpy and OpenCV (py7zr when `archives=True`).

    python -m tfds_sipakmed.synthetic --output_dir=M --cells_per_class=N [--seed=0]
        [--scale=0.5] [--archives]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import cv2
import numpy as np

from tfds_sipakmed.layout import polygon_area, sha256_file
from tfds_sipakmed.taxonomy import SIPAKMED

CROP_MARGIN = 10  # px added on each side of the cell contour's bounding box (real data: ~10)
SYNTHETIC_CHECKSUMS = "SYNTHETIC_SHA256SUMS"  # written next to synthetic archives


@dataclass(frozen=True)
class Morphology:
    """One class's look, in native (real-data) pixels; see the dataset notes' table."""

    cell_area: float  # median whole-cell area, px^2
    nuc_area: float  # median nucleus area, px^2
    cells_per_cluster: float  # mean annotated cells per cluster image
    shape: str  # 'polygon' (flat, angular) or 'round'
    aspect: tuple[float, float]  # cell elongation range
    wobble: float  # amplitude of low-frequency contour irregularity
    density: tuple[float, float]  # cytoplasm opacity over the background
    stain: str  # 'cyan', 'eosin' or 'either' (both per-cluster colours are random)
    nuc_value: tuple[float, float]  # nucleus brightness (HSV value), lower is darker
    nuc_wobble: float  # nucleus irregularity
    nuc_offset: tuple[float, float]  # nucleus centre offset, fraction of the cell radius
    spacing: tuple[float, float]  # centre distance / (r_i + r_j) between neighbours


MORPHOLOGY = {
    "Superficial-Intermediate": Morphology(
        cell_area=84000,
        nuc_area=1203,
        cells_per_cluster=6.6,
        shape="polygon",
        aspect=(1.0, 1.6),
        wobble=0.0,
        density=(0.30, 0.45),
        stain="either",
        nuc_value=(0.10, 0.22),
        nuc_wobble=0.03,
        nuc_offset=(0.0, 0.25),
        spacing=(0.85, 1.15),
    ),
    "Parabasal": Morphology(
        cell_area=12600,
        nuc_area=2473,
        cells_per_cluster=7.3,
        shape="round",
        aspect=(1.0, 1.2),
        wobble=0.03,
        density=(0.75, 0.90),
        stain="cyan",
        nuc_value=(0.55, 0.70),
        nuc_wobble=0.03,
        nuc_offset=(0.0, 0.12),
        spacing=(0.95, 1.25),
    ),
    "Metaplastic": Morphology(
        cell_area=21800,
        nuc_area=2317,
        cells_per_cluster=2.9,
        shape="round",
        aspect=(1.0, 1.3),
        wobble=0.05,
        density=(0.70, 0.85),
        stain="cyan",
        nuc_value=(0.18, 0.30),
        nuc_wobble=0.04,
        nuc_offset=(0.35, 0.50),
        spacing=(1.05, 1.4),
    ),
    "Koilocytotic": Morphology(
        cell_area=9000,
        nuc_area=2198,
        cells_per_cluster=3.5,
        shape="round",
        aspect=(1.0, 1.4),
        wobble=0.06,
        density=(0.30, 0.45),
        stain="either",
        nuc_value=(0.10, 0.22),
        nuc_wobble=0.12,
        nuc_offset=(0.0, 0.12),
        spacing=(1.0, 1.35),
    ),
    "Dyskeratotic": Morphology(
        cell_area=4600,
        nuc_area=880,
        cells_per_cluster=3.6,
        shape="round",
        aspect=(1.3, 1.9),
        wobble=0.05,
        density=(0.90, 0.97),
        stain="eosin",
        nuc_value=(0.05, 0.15),
        nuc_wobble=0.08,
        nuc_offset=(0.0, 0.15),
        spacing=(0.70, 0.90),
    ),
}


# --------------------------------------------------------------------------------------------
# Geometry


def _blob(rng, n, aspect, wobble, harmonics=4):
    """A smooth closed contour around the origin of unit-ish radius, [n, 2]."""
    t = np.linspace(0, 2 * np.pi, n + 1)[:-1] + rng.uniform(0, 2 * np.pi / n)
    r = np.ones_like(t)
    for k in range(2, 2 + harmonics):
        r += wobble * rng.normal() / math.sqrt(k - 1) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    pts = np.stack([r * np.cos(t) * aspect, r * np.sin(t)], axis=1)
    return _rotate(pts, rng.uniform(0, np.pi))


def _polygon(rng, n, aspect):
    """A flat angular polygon (5-8 corners) resampled to n points along its edges."""
    k = int(rng.integers(5, 9))
    # corners roughly evenly spread, so the polygon stays convex-ish and flat
    ang = np.linspace(0, 2 * np.pi, k + 1)[:-1] + rng.uniform(-0.35, 0.35, k) * (np.pi / k)
    ang = np.sort(ang)
    rad = rng.uniform(0.85, 1.15, k)
    corners = np.stack([rad * np.cos(ang) * aspect, rad * np.sin(ang)], axis=1)
    closed = np.concatenate([corners, corners[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    cum = np.concatenate([[0], np.cumsum(seg)])
    s = np.linspace(0, cum[-1], n + 1)[:-1]
    x = np.interp(s, cum, closed[:, 0])
    y = np.interp(s, cum, closed[:, 1])
    return _rotate(np.stack([x, y], axis=1), rng.uniform(0, np.pi))


def _rotate(pts, theta):
    c, s = math.cos(theta), math.sin(theta)
    return pts @ np.array([[c, s], [-s, c]])


def _with_area(pts, area):
    return pts * math.sqrt(area / max(polygon_area(pts), 1e-9))


# --------------------------------------------------------------------------------------------
# Colour


def _hsv(h, s, v):
    """HSV (h in degrees, s and v in [0, 1]) to an RGB float32 triple in [0, 255]."""
    px = np.array([[[h / 2.0, s * 255.0, v * 255.0]]], np.float32).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _cluster_palette(rng):
    """Per-cluster colours, drawn identically for every class."""
    return {
        "background": _hsv(rng.uniform(0, 360), rng.uniform(0.03, 0.25), rng.uniform(0.78, 0.97)),
        "cyan": _hsv(rng.uniform(0, 360), rng.uniform(0.25, 0.65), rng.uniform(0.55, 0.9)),
        "eosin": _hsv(rng.uniform(0, 360), rng.uniform(0.25, 0.65), rng.uniform(0.55, 0.9)),
        "nucleus_hue": rng.uniform(200, 320),
        "nucleus_sat": rng.uniform(0.3, 0.7),
    }


# --------------------------------------------------------------------------------------------
# One cell


@dataclass
class _Cell:
    cls: str
    centre: np.ndarray  # (x, y)
    cyt: np.ndarray  # [N, 2] relative to the centre
    nuc: np.ndarray  # [M, 2] relative to the centre
    extra_nuclei: list  # more nuclei (binucleate koilocytes), drawn but not annotated
    halo: np.ndarray | None  # koilocyte perinuclear clear zone, relative to the centre
    vacuole: tuple | None  # (x, y, radius) relative to the centre
    density: float
    colour: np.ndarray
    nuc_colour: np.ndarray
    radius: float


def _make_cell(rng, cls, scale, palette):
    m = MORPHOLOGY[cls]
    cell_area = m.cell_area * scale**2 * math.exp(rng.normal(0, 0.22))
    nuc_area = m.nuc_area * scale**2 * math.exp(rng.normal(0, 0.22))
    nuc_area = min(nuc_area, 0.55 * cell_area)
    aspect = rng.uniform(*m.aspect)
    n_cyt = int(rng.integers(48, 72))
    if m.shape == "polygon":
        cyt = _polygon(rng, n_cyt, aspect)
    else:
        cyt = _blob(rng, n_cyt, aspect, m.wobble)
    cyt = _with_area(cyt, cell_area)
    radius = math.sqrt(cell_area / math.pi)

    nuc_r = math.sqrt(nuc_area / math.pi)
    nuc = _with_area(
        _blob(rng, int(rng.integers(14, 30)), rng.uniform(1.0, 1.25), m.nuc_wobble), nuc_area
    )
    # nucleus centre: offset from the cell centre, kept well inside the cell
    off = rng.uniform(*m.nuc_offset) * radius
    direction = rng.uniform(0, 2 * np.pi)
    max_off = max(0.0, 0.8 * radius / math.sqrt(aspect) - nuc_r * 1.1)
    off = min(off, max_off)
    nuc_centre = off * np.array([math.cos(direction), math.sin(direction)])
    nuc = nuc + nuc_centre

    halo = None
    extra = []
    vacuole = None
    if cls == "Koilocytotic":
        if rng.uniform() < 0.25:  # binucleation
            shift = (
                nuc_r
                * rng.uniform(1.4, 1.8)
                * np.array([math.cos(direction + 1.5), math.sin(direction + 1.5)])
            )
            extra.append(nuc_centre + shift + (nuc - nuc_centre) * rng.uniform(0.7, 0.95))
        halo_r = min(nuc_r * rng.uniform(2.2, 2.8), 0.85 * radius / math.sqrt(aspect))
        halo = nuc_centre + _with_area(
            _blob(rng, 40, rng.uniform(1.0, 1.3), 0.1), math.pi * halo_r**2
        )
        if extra:
            halo = halo + 0.5 * (extra[0].mean(0) - nuc_centre)
    if cls == "Metaplastic" and rng.uniform() < 0.5:
        vr = radius * rng.uniform(0.10, 0.18)
        vacuole = (*(-nuc_centre / max(off, 1e-6) * radius * 0.35), vr)

    stain = m.stain if m.stain != "either" else ("cyan" if rng.uniform() < 0.5 else "eosin")
    colour = palette[stain] * rng.uniform(0.92, 1.08)
    if cls == "Dyskeratotic":  # keratinised: a deeper shade of the cluster's eosinophilic stain
        colour = colour * 0.8
    nuc_colour = _hsv(
        palette["nucleus_hue"] + rng.uniform(-10, 10),
        palette["nucleus_sat"],
        rng.uniform(*m.nuc_value),
    )
    return _Cell(
        cls=cls,
        centre=np.zeros(2),
        cyt=cyt,
        nuc=nuc,
        extra_nuclei=extra,
        halo=halo,
        vacuole=vacuole,
        density=rng.uniform(*m.density),
        colour=colour,
        nuc_colour=nuc_colour,
        radius=radius,
    )


# --------------------------------------------------------------------------------------------
# Drawing


_SHIFT = 3  # sub-pixel bits for cv2.fillPoly


def _mask(shape, pts, origin):
    """Anti-aliased float mask in [0, 1] of a polygon (absolute coords) on an ROI at origin."""
    m = np.zeros(shape, np.uint8)
    p = np.round((pts - origin) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(m, [p], 255, lineType=cv2.LINE_AA, shift=_SHIFT)
    return m.astype(np.float32) * (1.0 / 255.0)


def _outline(shape, pts, origin, thickness):
    m = np.zeros(shape, np.uint8)
    p = np.round((pts - origin) * (1 << _SHIFT)).astype(np.int32)
    cv2.polylines(m, [p], True, 255, thickness=thickness, lineType=cv2.LINE_AA, shift=_SHIFT)
    return m.astype(np.float32) * (1.0 / 255.0)


def _blend(roi, alpha, colour):
    a = alpha[..., None]
    roi *= 1.0 - a
    roi += a * colour


def _draw_cell(img, cell, rng, scale, background):
    h, w = img.shape[:2]
    cyt = cell.cyt + cell.centre
    x0 = max(0, int(math.floor(cyt[:, 0].min())) - 3)
    y0 = max(0, int(math.floor(cyt[:, 1].min())) - 3)
    x1 = min(w, int(math.ceil(cyt[:, 0].max())) + 4)
    y1 = min(h, int(math.ceil(cyt[:, 1].max())) + 4)
    if x1 <= x0 or y1 <= y0:
        return
    roi = img[y0:y1, x0:x1]
    shape = roi.shape[:2]
    origin = np.array([x0, y0], np.float64)
    cell_m = _mask(shape, cyt, origin)
    # cytoplasm texture: smooth low-frequency density variation
    tex = cv2.resize(
        rng.normal(0, 1, (6, 6)).astype(np.float32), shape[::-1], interpolation=cv2.INTER_CUBIC
    )
    alpha = cell_m * np.clip(cell.density * (1.0 + 0.08 * tex), 0, 1)
    _blend(roi, alpha, cell.colour)
    thick = max(2, round(3 * scale)) if cell.cls == "Metaplastic" else 1
    edge = 0.45 if cell.cls == "Metaplastic" else 0.8
    _blend(roi, _outline(shape, cyt, origin, thick) * 0.8, cell.colour * edge)

    if cell.vacuole is not None:
        vx, vy, vr = cell.vacuole
        vm = np.zeros(shape, np.uint8)
        c = (cell.centre + (vx, vy) - origin) * (1 << _SHIFT)
        cv2.circle(
            vm,
            (int(c[0]), int(c[1])),
            int(vr * (1 << _SHIFT)),
            255,
            -1,
            lineType=cv2.LINE_AA,
            shift=_SHIFT,
        )
        _blend(roi, vm.astype(np.float32) / 255.0 * cell_m * 0.7, background)

    if cell.halo is not None:
        halo = cell.halo + cell.centre
        hm = _mask(shape, halo, origin) * cell_m
        _blend(roi, hm * 0.95, background)  # the clear perinuclear cavity
        rim = _outline(shape, halo, origin, max(2, round(5 * scale))) * cell_m
        _blend(roi, rim * 0.95, cell.colour * 0.6)  # its dense rim

    for k, nuc_rel in enumerate([cell.nuc, *cell.extra_nuclei]):
        nuc = nuc_rel + cell.centre
        nm = _mask(shape, nuc, origin)
        if cell.cls == "Parabasal":
            # vesicular: pale chromatin with granules and a crisp nuclear membrane
            _blend(roi, nm * 0.9, cell.nuc_colour)
            gran = rng.uniform(0, 1, (max(1, shape[0] // 3), max(1, shape[1] // 3))) < 0.12
            gran = cv2.resize(gran.astype(np.float32), shape[::-1], interpolation=cv2.INTER_NEAREST)
            _blend(roi, nm * gran * 0.6, cell.nuc_colour * 0.4)
            ring = _outline(shape, nuc, origin, max(2, round(3 * scale)))
            _blend(roi, ring, cell.nuc_colour * 0.35)
        else:
            _blend(roi, nm * 0.95, cell.nuc_colour * (1.0 if k == 0 else 1.1))


def _place(rng, cells, cls):
    """Put cells next to each other (a cluster), touching or overlapping as the class does."""
    m = MORPHOLOGY[cls]
    placed = []
    for cell in cells:
        if not placed:
            cell.centre = np.zeros(2)
        else:
            for _ in range(60):
                anchor = placed[int(rng.integers(len(placed)))]
                d = (anchor.radius + cell.radius) * rng.uniform(*m.spacing)
                a = rng.uniform(0, 2 * np.pi)
                c = anchor.centre + d * np.array([math.cos(a), math.sin(a)])
                if all(
                    np.linalg.norm(c - o.centre) >= m.spacing[0] * (o.radius + cell.radius)
                    for o in placed
                ):
                    break
            cell.centre = c
        placed.append(cell)


# --------------------------------------------------------------------------------------------
# Files


def _fmt(v: float) -> str:
    """A number as the real files write it: five significant digits, no trailing zeros."""
    s = f"{round(float(v), 2):.5g}"
    return "0" if s == "-0" else s


def format_dat(pts: np.ndarray, close: bool) -> str:
    """Contour text in the real `.dat` format: `x,y` per line, LF, optionally closed."""
    if len(pts) == 0:
        return ""
    if close:
        pts = np.concatenate([pts, pts[:1]])
    return "".join(f"{_fmt(x)},{_fmt(y)}\n" for x, y in pts)


def _reparse(text: str) -> np.ndarray:
    rows = [line.split(",") for line in text.splitlines() if line]
    return np.array(rows, np.float64).reshape(-1, 2)


def crop_box(cyt: np.ndarray, width: int, height: int, margin: int = CROP_MARGIN):
    """(x0, y0, x1, y1), exclusive ends: the contour's pixel bbox plus `margin`, clipped."""
    x0 = max(0, math.floor(cyt[:, 0].min()) - margin)
    y0 = max(0, math.floor(cyt[:, 1].min()) - margin)
    x1 = min(width, math.ceil(cyt[:, 0].max()) + margin + 1)
    y1 = min(height, math.ceil(cyt[:, 1].max()) + margin + 1)
    return x0, y0, x1, y1


def _write_bmp(path, rgb):
    if not cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {path}")


def _write_text(path, text):
    with open(path, "w", newline="\n") as f:
        f.write(text)


def _cluster_sizes(rng, mean, total):
    sizes = []
    while sum(sizes) < total:
        n = max(1, int(rng.poisson(mean - 1) + 1))
        n = min(n, 26, total - sum(sizes))
        sizes.append(n)
    return sizes


def _write_cluster(class_dir, cls, cluster_id, n_cells, rng, scale, bad_rate):
    palette = _cluster_palette(rng)
    annotated = [_make_cell(rng, cls, scale, palette) for _ in range(n_cells)]
    n_extra = int(rng.integers(1, 3)) if rng.uniform() < 0.7 else 0
    extra = [_make_cell(rng, cls, scale, palette) for _ in range(n_extra)]
    _place(rng, annotated + extra, cls)

    # canvas: the annotated cells plus a random margin (sometimes under the 10 px crop margin,
    # so crops get clipped); unannotated cells may stick out of the image
    allpts = np.concatenate([c.cyt + c.centre for c in annotated])
    pad = rng.uniform(2, 40)
    lo = np.floor(allpts.min(0) - pad)
    hi = np.ceil(allpts.max(0) + pad)
    for c in annotated + extra:
        c.centre = c.centre - lo
    width, height = int(hi[0] - lo[0]), int(hi[1] - lo[1])

    bg = palette["background"]
    illum = cv2.resize(
        rng.uniform(0.9, 1.06, (3, 3)).astype(np.float32),
        (width, height),
        interpolation=cv2.INTER_CUBIC,
    )
    img = np.empty((height, width, 3), np.float32)
    img[:] = bg
    order = rng.permutation(len(annotated) + len(extra))
    cells = annotated + extra
    for i in order:
        _draw_cell(img, cells[i], rng, scale, bg)
    img *= illum[..., None]
    sigma = rng.uniform(0.5, 1.3)
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(1.5, 4.0))
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    stem = f"{cluster_id:03d}"
    _write_bmp(os.path.join(class_dir, f"{stem}.bmp"), img)
    crop_dir = os.path.join(class_dir, "CROPPED")
    for k, cell in enumerate(annotated, start=1):
        cyt = cell.cyt + cell.centre
        nuc = cell.nuc + cell.centre
        bad = rng.uniform() < bad_rate
        if bad and rng.uniform() < 0.5:
            nuc = np.zeros((0, 2))  # empty nucleus contour
        elif bad:
            nuc = nuc + np.array([1.0, 0.6]) * cell.radius * 1.5  # drawn outside the cell
        cyt_txt = format_dat(cyt, close=True)
        nuc_txt = format_dat(nuc, close=True)
        _write_text(os.path.join(class_dir, f"{stem}_cyt{k:02d}.dat"), cyt_txt)
        _write_text(os.path.join(class_dir, f"{stem}_nuc{k:02d}.dat"), nuc_txt)
        cyt_w = _reparse(cyt_txt)[:-1]  # what a reader sees, without the repeated vertex
        nuc_w = _reparse(nuc_txt)[:-1] if len(nuc) else np.zeros((0, 2))
        x0, y0, x1, y1 = crop_box(cyt_w, width, height)
        name = f"{stem}_{k:02d}"
        _write_bmp(os.path.join(crop_dir, f"{name}.bmp"), img[y0:y1, x0:x1])
        off = np.array([x0, y0], np.float64)
        _write_text(os.path.join(crop_dir, f"{name}_cyt.dat"), format_dat(cyt_w - off, False))
        _write_text(os.path.join(crop_dir, f"{name}_nuc.dat"), format_dat(nuc_w - off, False))


def _class_seed(seed: int, cls: str) -> list[int]:
    digest = hashlib.sha256(cls.encode()).digest()
    return [int(seed), int.from_bytes(digest[:4], "little")]


def write_synthetic(
    out_dir: str,
    cells_per_class: int,
    seed: int = 0,
    archives: bool = False,
    *,
    scale: float = 0.5,
    bad_annotation_rate: float = 0.012,
    classes=SIPAKMED.class_names,
    verbose: bool = False,
) -> dict:
    """Writes a synthetic SIPaKMeD tree under `out_dir`; returns {class: number of cells}.

    `cells_per_class` annotated (cropped) cells per class, grouped into cluster images of the
    class's mean size. With `archives=True` each class folder is packed into `im_<Class>.7z`
    (py7zr) and removed, and `SYNTHETIC_SHA256SUMS` lists the archives' sha256 (pass that file
    to the builder's `archive_checksums`: these archives are not the published ones). Refuses
    to overwrite: every `im_<Class>` (and `.7z`) must be absent from `out_dir`.
    """
    if cells_per_class < 1:
        raise ValueError(f"cells_per_class must be at least 1, got {cells_per_class}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    os.makedirs(out_dir, exist_ok=True)
    for cls in classes:
        for p in (f"im_{cls}", f"im_{cls}.7z", SYNTHETIC_CHECKSUMS if archives else None):
            if p and os.path.exists(os.path.join(out_dir, p)):
                raise FileExistsError(
                    f"{os.path.join(out_dir, p)} already exists; write the synthetic dataset "
                    "into an empty --output_dir (nothing is overwritten)."
                )
    counts = {}
    for cls in classes:
        t0 = time.time()
        rng = np.random.default_rng(_class_seed(seed, cls))
        sizes = _cluster_sizes(rng, MORPHOLOGY[cls].cells_per_cluster, cells_per_class)
        class_dir = os.path.join(out_dir, f"im_{cls}")
        os.makedirs(os.path.join(class_dir, "CROPPED"))
        for i, n in enumerate(sizes, start=1):
            crng = np.random.default_rng([*_class_seed(seed, cls), i])
            _write_cluster(class_dir, cls, i, n, crng, scale, bad_annotation_rate)
        counts[cls] = sum(sizes)
        if verbose:
            print(
                f"  {cls:<25} {counts[cls]:5d} cells in {len(sizes):4d} cluster images "
                f"({time.time() - t0:.1f} s)",
                flush=True,
            )
    if archives:
        _pack(out_dir, classes, verbose)
    return counts


def _pack(out_dir, classes, verbose):
    import py7zr  # lazily: only archive writing needs it

    lines = []
    for cls in classes:
        name = f"im_{cls}"
        path = os.path.join(out_dir, f"{name}.7z")
        filters = [{"id": py7zr.FILTER_LZMA2, "preset": 1}]
        with py7zr.SevenZipFile(path, "w", filters=filters) as z:
            z.writeall(os.path.join(out_dir, name), arcname=name)
        shutil.rmtree(os.path.join(out_dir, name))
        lines.append(f"{sha256_file(path)}  {name}.7z\n")
        if verbose:
            print(f"  wrote {path} ({os.path.getsize(path)} bytes)", flush=True)
    _write_text(os.path.join(out_dir, SYNTHETIC_CHECKSUMS), "".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tfds_sipakmed.synthetic",
        description="Write a synthetic SIPaKMeD with the real archives' file layout.",
    )
    p.add_argument("--output_dir", required=True, help="where im_<Class>/ (or .7z) go")
    p.add_argument("--cells_per_class", type=int, required=True, help="cropped cells per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=0.5, help="length scale vs the real cells")
    p.add_argument(
        "--archives",
        action="store_true",
        help="pack each class into im_<Class>.7z and write SYNTHETIC_SHA256SUMS",
    )
    a = p.parse_args(argv)
    t0 = time.time()
    print(f"Writing synthetic SIPaKMeD to {a.output_dir} ...", flush=True)
    try:
        counts = write_synthetic(
            a.output_dir,
            a.cells_per_class,
            seed=a.seed,
            archives=a.archives,
            scale=a.scale,
            verbose=True,
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Done: {sum(counts.values())} cells in {time.time() - t0:.1f} s.")
    if a.archives:
        print(
            "These archives are not the published ones: build with "
            f"--archive_checksums={os.path.join(a.output_dir, SYNTHETIC_CHECKSUMS)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
