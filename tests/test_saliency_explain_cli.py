"""Overlays and the `python -m sipak_jax.explain` command on a tiny model DIR."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from saliency_fixtures import tiny_model

from sipak_jax import explain, model_io, preprocessing
from sipak_jax.saliency import overlay
from tfds_sipakmed.taxonomy import Taxonomy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    spec = preprocessing.spec_for("scratch", image_size=64, resize="pad")
    model = tiny_model()
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=Taxonomy.bare(["a", "b", "c", "d", "e"]),
        preprocessing=spec,
    )
    model_io.save_model_dir(path / "m", model, meta)
    return str(path / "m")


def _write_crops(folder, shapes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(shapes):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        p = folder / f"cell{i}.bmp"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def test_map_to_crop_inverts_the_pad_and_stretch_frames():
    # A map that is a linear ramp in the frame comes back to the crop pixels that produced it.
    for policy in ("pad", "stretch"):
        crop_shape = (30, 50)
        size = 64
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        frame = xx + 100 * yy
        back = overlay.map_to_crop(frame, crop_shape, policy)
        assert back.shape == crop_shape
        pts = np.array([[0, 0], [49, 29], [10, 20]], np.float32)
        fx = preprocessing.crop_to_frame(pts, crop_shape, size, policy)
        for (cx, cy), (x, y) in zip(pts.astype(int), fx, strict=True):
            x, y = np.clip(x, 0, size - 1), np.clip(y, 0, size - 1)
            np.testing.assert_allclose(back[cy, cx], x + 100 * y, rtol=1e-4)


def test_overlay_keeps_unimportant_pixels_and_save_png_never_overwrites(tmp_path):
    img = np.full((10, 12, 3), 100, np.uint8)
    m = np.zeros((10, 12), np.float32)
    m[5, 6] = 1.0
    out = overlay.overlay(img, m)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out[0, 0] == 100).all() and not (out[5, 6] == 100).all()
    p = tmp_path / "o.png"
    overlay.save_png(p, out)
    with pytest.raises(FileExistsError):
        overlay.save_png(p, out)


def test_overlay_batch_for_tensorboard(model_dir):
    model, meta = model_io.load_model_dir(model_dir)
    imgs = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    out = overlay.overlay_batch(model, imgs, meta.preprocessing, "gradcam", stage=3)
    assert out.shape == (3, 64, 64, 3) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1


def test_explain_run_writes_overlays_at_crop_size_and_raw_maps(model_dir, tmp_path):
    paths = _write_crops(tmp_path / "in", [(40, 70), (55, 30)])
    out = tmp_path / "out"
    recs = explain.run(
        model_dir,
        [str(tmp_path / "in")],
        str(out),
        ["gradcam", "ig"],
        save_raw=True,
        ig_steps=8,
        log=lambda s: None,
    )
    assert len(recs) == 4
    for p in paths:
        crop = cv2.imread(str(p))
        for m in ("gradcam", "ig"):
            png = cv2.imread(str(out / f"{p.stem}.{m}.png"))
            assert png.shape == crop.shape
            raw = np.load(out / f"{p.stem}.{m}.npy")
            assert raw.shape == (64, 64) and raw.dtype == np.float32
    assert all("ig_completeness_gap" in r for r in recs if r["method"] == "ig")
    # A second run refuses to overwrite, before doing anything.
    with pytest.raises(FileExistsError, match="already exist"):
        explain.run(model_dir, [str(p) for p in paths], str(out), ["gradcam"])


def test_explain_rejects_clashing_stems_and_bad_input(model_dir, tmp_path):
    a = _write_crops(tmp_path / "a", [(20, 20)])[0]
    b = _write_crops(tmp_path / "b", [(20, 20)])[0]
    with pytest.raises(ValueError, match="same stem"):
        explain.run(model_dir, [str(a), str(b)], str(tmp_path / "o"), ["gradcam"])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        explain.run(model_dir, [str(tmp_path / "nope.png")], str(tmp_path / "o"), ["gradcam"])
    with pytest.raises(ValueError, match="unknown --method"):
        explain.run(model_dir, [str(a)], str(tmp_path / "o"), ["magic"])


@pytest.mark.slow
def test_explain_command_line(model_dir, tmp_path):
    _write_crops(tmp_path / "in", [(33, 47)])
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "sipak_jax.explain",
        f"--checkpoint={model_dir}",
        "--method=gradcam",
        f"--output_dir={out}",
        "--save_raw",
        str(tmp_path / "in"),
    ]
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "cell0.gradcam.png").exists() and (out / "cell0.gradcam.npy").exists()
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r2.returncode == 2 and "not overwriting" in r2.stderr


def test_explain_path_never_imports_tensorflow():
    code = (
        "import sys, sipak_jax.explain, sipak_jax.saliency, sipak_jax.saliency.overlay, "
        "sipak_jax.saliency.metrics, sipak_jax.saliency_eval; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
