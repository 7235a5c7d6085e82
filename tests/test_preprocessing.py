"""Resize policies, normalisation against Keras and torchvision, and image reading."""

import os

import cv2
import jax
import numpy as np
import pytest

from sipak_jax import preprocessing as pp


def _images(n=3, h=7, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ---- normalisation ------------------------------------------------------------------------


def test_keras_spec_matches_keras_resnet50_preprocess_input():
    keras_resnet50 = pytest.importorskip("keras.applications.resnet50")
    x = _images()
    want = keras_resnet50.preprocess_input(x.astype(np.float32).copy())
    got = np.asarray(pp.normalize(x, pp.spec_for("keras")))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)


def test_torchvision_spec_matches_torchvision_weights_transforms():
    torch = pytest.importorskip("torch")
    tvm = pytest.importorskip("torchvision.models")
    import torchvision.transforms.functional as TF

    transforms = tvm.ResNet50_Weights.IMAGENET1K_V2.transforms()
    spec = pp.spec_for("torchvision")
    np.testing.assert_allclose(np.asarray(spec["mean"]) / 255, transforms.mean, atol=1e-9)
    np.testing.assert_allclose(np.asarray(spec["std"]) / 255, transforms.std, atol=1e-9)
    x = _images()
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    want = TF.normalize(t, transforms.mean, transforms.std).permute(0, 2, 3, 1).numpy()
    got = np.asarray(pp.normalize(x, spec))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_scratch_spec_maps_to_minus_one_one_and_normalize_works_in_jit():
    spec = pp.spec_for("scratch", image_size=32, resize="stretch")
    assert spec["image_size"] == 32 and spec["resize"] == "stretch"
    x = np.array([[[[0, 255, 128]]]], np.uint8)
    got = np.asarray(jax.jit(lambda a: pp.normalize(a, spec))(x))
    np.testing.assert_allclose(got, [[[[-1.0, 1.0, 0.5 / 127.5]]]], atol=1e-6)
    assert got.dtype == np.float32
    # Floats on the 0-255 scale (augmentation output) normalise the same way.
    np.testing.assert_allclose(np.asarray(pp.normalize(x.astype(np.float32), spec)), got)


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="weight source"):
        pp.spec_for("caffe2")
    with pytest.raises(ValueError, match="resize policy"):
        pp.spec_for("keras", resize="crop")
    with pytest.raises(ValueError, match="channel_order"):
        pp.normalize(_images(), {"channel_order": "RBG", "mean": [0] * 3, "std": [1] * 3})
    with pytest.raises(ValueError, match="'std'"):
        pp.normalize(_images(), {"channel_order": "RGB", "mean": [0] * 3})
    with pytest.raises(ValueError, match="std must be positive"):
        pp.normalize(_images(), {"channel_order": "RGB", "mean": [0] * 3, "std": [1, 0, 1]})


# ---- resize policies ----------------------------------------------------------------------


def _cell_crop(h=60, w=120, background=(200, 210, 190), cell=(90, 40, 140)):
    """A round cell (disc) on a flat background in a wide crop."""
    crop = np.empty((h, w, 3), np.uint8)
    crop[...] = background
    cv2.circle(crop, (w // 2, h // 2), min(h, w) // 2 - 5, cell, -1)
    return crop


def test_border_colour_is_the_median_of_the_outer_ring():
    crop = _cell_crop()
    crop[0, :10] = (0, 0, 0)  # a neighbouring cell touching the edge does not shift it
    np.testing.assert_array_equal(pp.border_colour(crop), (200, 210, 190))


def test_stretch_is_cv2_resize():
    crop = _cell_crop()
    got = pp.resize_crop(crop, 32, "stretch")
    np.testing.assert_array_equal(got, cv2.resize(crop, (32, 32), interpolation=cv2.INTER_AREA))
    big = pp.resize_crop(crop, 224, "stretch")
    np.testing.assert_array_equal(big, cv2.resize(crop, (224, 224), interpolation=cv2.INTER_LINEAR))


def test_pad_keeps_the_cell_round_and_fills_with_the_border_colour():
    crop = _cell_crop()
    size = 64
    padded = pp.resize_crop(crop, size, "pad")
    stretched = pp.resize_crop(crop, size, "stretch")
    assert padded.shape == stretched.shape == (size, size, 3) and padded.dtype == np.uint8
    # The added bands (top and bottom) hold exactly the border colour.
    np.testing.assert_array_equal(padded[:10].reshape(-1, 3), [[200, 210, 190]] * (10 * size))
    np.testing.assert_array_equal(padded[-10:].reshape(-1, 3), [[200, 210, 190]] * (10 * size))

    def cell_box(img):
        ys, xs = np.nonzero(np.abs(img.astype(int) - (90, 40, 140)).sum(-1) < 60)
        return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1

    w, h = cell_box(padded)
    assert abs(w - h) <= 1  # still round
    w, h = cell_box(stretched)
    assert h > 1.7 * w  # squeezed horizontally into an ellipse


@pytest.mark.parametrize("policy", pp.RESIZE_POLICIES)
@pytest.mark.parametrize("size", [32, 224])
def test_crop_to_frame_maps_points_onto_the_resized_image(policy, size):
    crop = np.zeros((50, 80, 3), np.uint8)
    crop[...] = 128  # flat border
    # Mark a 5x5 blob centred at (x=61, y=12) in crop pixels.
    crop[10:15, 59:64] = 255
    out = pp.resize_crop(crop, size, policy).astype(np.float64)
    weight = np.clip(out[..., 0] - 128, 0, None)
    ys, xs = np.mgrid[:size, :size]
    centroid = (xs * weight).sum() / weight.sum(), (ys * weight).sum() / weight.sum()
    mapped = pp.crop_to_frame([[61, 12]], crop.shape[:2], size, policy)[0]
    np.testing.assert_allclose(mapped, centroid, atol=0.2 + size / 80 * 0.1)


def test_resize_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        pp.resize_crop(np.zeros((4, 4, 3), np.float32), 8)
    with pytest.raises(ValueError, match="RGB image"):
        pp.resize_crop(np.zeros((4, 4), np.uint8), 8)
    with pytest.raises(ValueError, match="resize policy"):
        pp.resize_crop(np.zeros((4, 4, 3), np.uint8), 8, "squash")


# ---- any user image -> uint8 RGB ---------------------------------------------------------


def test_to_rgb_uint8_handles_gray_bgr_16bit():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (6, 4), dtype=np.uint8)
    out = pp.to_rgb_uint8(gray)
    assert out.shape == (6, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    bgr = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pp.to_rgb_uint8(bgr), bgr[..., ::-1])
    np.testing.assert_array_equal(pp.to_rgb_uint8(bgr, "RGB"), bgr)
    x16 = rng.integers(0, 65536, (6, 4, 3), dtype=np.uint16)
    want = cv2.convertScaleAbs(x16, alpha=1 / 257)[..., ::-1]  # OpenCV's own 16->8 bit
    np.testing.assert_array_equal(pp.to_rgb_uint8(x16), want)


def test_rgba_is_composited_over_white_like_pil(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    path = tmp_path / "cell.png"
    Image.fromarray(rgba, "RGBA").save(path)
    white = Image.new("RGBA", (7, 5), (255, 255, 255, 255))
    want = np.asarray(Image.alpha_composite(white, Image.open(path)).convert("RGB"))
    got = pp.read_image(path)
    assert got.dtype == np.uint8 and got.shape == (5, 7, 3)
    assert np.abs(got.astype(int) - want).max() <= 1  # PIL rounds with integer arithmetic
    np.testing.assert_array_equal(got[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(got[0, 1], rgba[0, 1, :3])


def test_read_image_reads_16bit_gray_png_and_bmp(tmp_path):
    x16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), x16)
    got = pp.read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(got[..., 1], np.rint(x16 / 257).astype(np.uint8))
    rgb = np.random.default_rng(3).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.bmp"), rgb[..., ::-1])
    np.testing.assert_array_equal(pp.read_image(str(tmp_path / "c.bmp")), rgb)


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        pp.read_image(tmp_path / "missing.png")
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not_an_image.png"):
        pp.read_image(bad)
    empty = tmp_path / "empty.bmp"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=os.path.basename(empty)):
        pp.read_image(empty)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pp.to_rgb_uint8(np.full((2, 2), 2.0, np.float32), name="x.tif")


def test_preprocess_image_uses_the_spec():
    crop = _cell_crop()
    spec = pp.spec_for("torchvision", image_size=40, resize="pad")
    np.testing.assert_array_equal(pp.preprocess_image(crop, spec), pp.resize_crop(crop, 40))
