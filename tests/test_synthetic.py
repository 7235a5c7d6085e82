"""The synthetic SIPaKMeD: deterministic, the real file layout and formats, crops at bbox+10 px,
each class's morphology from the dataset notes. No TensorFlow needed."""

import glob
import hashlib
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tfds_sipakmed import layout, synthetic
from tfds_sipakmed.taxonomy import SIPAKMED

CLASS_NAMES = SIPAKMED.class_names

_LINE = re.compile(r"^-?\d+(\.\d+)?,-?\d+(\.\d+)?$")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    counts = synthetic.write_synthetic(str(out), 12, seed=3, scale=0.25)
    return str(out), counts


def _digest(root):
    h = {}
    for p in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            with open(p, "rb") as f:
                h[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return h


def test_counts_and_layout(tree):
    root, counts = tree
    assert counts == dict.fromkeys(CLASS_NAMES, 12)
    for cls in CLASS_NAMES:
        d = os.path.join(root, f"im_{cls}")
        crops = sorted(glob.glob(os.path.join(d, "CROPPED", "*.bmp")))
        assert len(crops) == 12
        for c in crops:
            stem = os.path.basename(c)[:-4]
            assert re.fullmatch(r"\d{3}_\d{2}", stem)
            assert os.path.isfile(os.path.join(d, "CROPPED", stem + "_cyt.dat"))
            assert os.path.isfile(os.path.join(d, "CROPPED", stem + "_nuc.dat"))
            nnn, kk = stem.split("_")
            assert os.path.isfile(os.path.join(d, f"{nnn}_cyt{kk}.dat"))
            assert os.path.isfile(os.path.join(d, f"{nnn}_nuc{kk}.dat"))
        clusters = sorted(glob.glob(os.path.join(d, "[0-9][0-9][0-9].bmp")))
        assert clusters and os.path.basename(clusters[0]) == "001.bmp"  # ids restart per class
        assert len(clusters) < len(crops) or cls == "Metaplastic"


def test_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthetic.write_synthetic(str(a), 4, seed=7, scale=0.2)
    synthetic.write_synthetic(str(b), 4, seed=7, scale=0.2)
    synthetic.write_synthetic(str(c), 4, seed=8, scale=0.2)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_dat_format_is_the_real_one(tree):
    root, _ = tree
    for p in glob.glob(os.path.join(root, "im_*", "**", "*.dat"), recursive=True):
        with open(p, "rb") as f:
            raw = f.read()
        assert b"\r" not in raw and b" " not in raw
        if not raw:  # an empty nucleus contour (a bad annotation, as in the real data)
            continue
        assert raw.endswith(b"\n")
        lines = raw.decode("ascii").splitlines()
        assert all(_LINE.match(line) for line in lines), p
        # five significant digits at most, like the real files (1146.5, 366.25, 1389.8)
        assert all(len(v.lstrip("-").replace(".", "")) <= 5 for ln in lines for v in ln.split(","))
        if "CROPPED" not in p:  # cluster-level polygons repeat their first vertex at the end
            assert lines[0] == lines[-1] and len(lines) > 3


def test_crops_are_bbox_plus_10px_clipped(tree):
    root, _ = tree
    clipped = unclipped = 0
    for cls in CLASS_NAMES:
        d = os.path.join(root, f"im_{cls}")
        for crop_path in sorted(glob.glob(os.path.join(d, "CROPPED", "*.bmp"))):
            nnn, kk = os.path.basename(crop_path)[:-4].split("_")
            cluster = np.asarray(Image.open(os.path.join(d, f"{nnn}.bmp")).convert("RGB"))
            crop = np.asarray(Image.open(crop_path).convert("RGB"))
            cyt = layout.read_dat(os.path.join(d, f"{nnn}_cyt{kk}.dat")).astype(np.float64)
            h, w = cluster.shape[:2]
            x0 = max(0, math.floor(cyt[:, 0].min()) - 10)
            y0 = max(0, math.floor(cyt[:, 1].min()) - 10)
            x1 = min(w, math.ceil(cyt[:, 0].max()) + 11)
            y1 = min(h, math.ceil(cyt[:, 1].max()) + 11)
            np.testing.assert_array_equal(crop, cluster[y0:y1, x0:x1])
            if (x0, y0, x1, y1) == (
                math.floor(cyt[:, 0].min()) - 10,
                math.floor(cyt[:, 1].min()) - 10,
                math.ceil(cyt[:, 0].max()) + 11,
                math.ceil(cyt[:, 1].max()) + 11,
            ):
                unclipped += 1
            else:
                clipped += 1
            # crop-level contours: the same vertices shifted into the crop, not closed
            crop_cyt = layout.read_dat(crop_path[:-4] + "_cyt.dat")
            np.testing.assert_allclose(crop_cyt, cyt[:-1] - (x0, y0), atol=0.006)
            nuc = layout.read_dat(os.path.join(d, f"{nnn}_nuc{kk}.dat")).astype(np.float64)
            crop_nuc = layout.read_dat(crop_path[:-4] + "_nuc.dat")
            if len(nuc):
                np.testing.assert_allclose(crop_nuc, nuc[:-1] - (x0, y0), atol=0.006)
            else:
                assert crop_nuc.shape == (0, 2)
    assert clipped and unclipped  # both cases occur, as in the real data


def test_bmp_is_24bit_and_readable_by_pillow(tree):
    root, _ = tree
    p = sorted(glob.glob(os.path.join(root, "im_Parabasal", "CROPPED", "*.bmp")))[0]
    with open(p, "rb") as f:
        head = f.read(54)
    assert head[:2] == b"BM" and int.from_bytes(head[28:30], "little") == 24
    np.testing.assert_array_equal(layout.read_bmp(p), np.asarray(Image.open(p).convert("RGB")))


def _contour_stats(root, cls):
    cells, nc = [], []
    for p in glob.glob(os.path.join(root, f"im_{cls}", "CROPPED", "*_cyt.dat")):
        cyt = layout.read_dat(p)
        nuc = layout.read_dat(p.replace("_cyt.dat", "_nuc.dat"))
        if layout.check_annotation(cyt, nuc, 10**6, 10**6):
            continue
        a = layout.polygon_area(cyt)
        cells.append(a)
        nc.append(layout.polygon_area(nuc) / a)
    return float(np.median(cells)), float(np.median(nc))


def test_morphology_follows_the_notes(tmp_path):
    root = str(tmp_path)
    scale = 0.3
    synthetic.write_synthetic(root, 40, seed=0, scale=scale, bad_annotation_rate=0.0)
    stats = {cls: _contour_stats(root, cls) for cls in CLASS_NAMES}
    for cls, (cell_area, ratio) in stats.items():
        m = synthetic.MORPHOLOGY[cls]
        assert cell_area == pytest.approx(m.cell_area * scale**2, rel=0.2), cls
        assert ratio == pytest.approx(m.nuc_area / m.cell_area, rel=0.3), cls
    # the notes' ordering: size SI > Metaplastic > Parabasal > Koilocytotic > Dyskeratotic
    sizes = [stats[c][0] for c in ("Superficial-Intermediate", "Metaplastic", "Parabasal")]
    sizes += [stats[c][0] for c in ("Koilocytotic", "Dyskeratotic")]
    assert sizes == sorted(sizes, reverse=True)
    assert stats["Superficial-Intermediate"][1] < 0.03 < stats["Metaplastic"][1] < 0.17


def test_colour_does_not_carry_the_label(tmp_path):
    """Mean crop colour per class overlaps: backgrounds and stains are drawn per cluster image
    identically for every class."""
    root = str(tmp_path)
    synthetic.write_synthetic(root, 30, seed=1, scale=0.2)
    hues = {}
    for cls in CLASS_NAMES:
        h = []
        for p in glob.glob(os.path.join(root, f"im_{cls}", "CROPPED", "*.bmp")):
            rgb = np.asarray(Image.open(p).convert("RGB"), np.float64).reshape(-1, 3)
            h.append(rgb.mean(0))
        hues[cls] = np.array(h)
    # the spread of mean colours within every class is wide (random stains/backgrounds)
    for cls, h in hues.items():
        assert h.std(0).max() > 12, cls


def test_archives_and_checksums(tmp_path):
    root = str(tmp_path)
    synthetic.write_synthetic(root, 2, seed=0, scale=0.15, archives=True)
    sums = layout.read_checksums_file(os.path.join(root, synthetic.SYNTHETIC_CHECKSUMS))
    assert sorted(sums) == sorted(layout.ARCHIVE_NAMES)
    for name, sha in sums.items():
        assert layout.sha256_file(os.path.join(root, name)) == sha
    assert not any(os.path.isdir(os.path.join(root, f"im_{c}")) for c in CLASS_NAMES)


def test_refuses_to_overwrite(tmp_path):
    synthetic.write_synthetic(str(tmp_path), 1, scale=0.15)
    with pytest.raises(FileExistsError, match="im_Dyskeratotic"):
        synthetic.write_synthetic(str(tmp_path), 1, scale=0.15)


def test_command_line(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run(
        [sys.executable, "-m", "tfds_sipakmed.synthetic", f"--output_dir={out}"]
        + ["--cells_per_class=2", "--scale=0.15", "--seed=4"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "10 cells" in r.stdout
    assert len(glob.glob(str(out / "im_*" / "CROPPED" / "*.bmp"))) == 10
    assert "tensorflow" not in r.stderr.lower()
