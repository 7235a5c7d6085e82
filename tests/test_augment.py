"""Augmentation ops against numpy, OpenCV and colorsys references, inside and outside jit."""

import colorsys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sipak_jax import augment as A

JIT = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, use_jit, **kw):
    return jax.jit(fn, **kw) if use_jit else fn


def _batch(n=32, size=12, seed=0):
    one = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return one, np.broadcast_to(one, (n, size, size, 3)).copy()


def _smooth(h, w, seed=0):
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)
    return cv2.GaussianBlur(noise, (5, 5), 2)


@JIT
def test_rot90_equals_np_rot90_per_example(use_jit):
    one, batch = _batch()
    fn = _maybe_jit(lambda r, x: A.augment(r, x, ("rot90",)), use_jit)
    out = np.asarray(fn(jax.random.key(0), jnp.asarray(batch)))
    assert out.dtype == np.uint8
    ks = []
    for o in out:
        matches = [k for k in range(4) if np.array_equal(o, np.rot90(one, k))]
        assert len(matches) == 1
        ks.append(matches[0])
    assert set(ks) == {0, 1, 2, 3}  # per-example draws, all four angles


@JIT
@pytest.mark.parametrize("name,axis", [("flip_lr", 1), ("flip_ud", 0)])
def test_flips_equal_np_flip_per_example(use_jit, name, axis):
    one, batch = _batch()
    fn = _maybe_jit(lambda r, x: A.augment(r, x, (name,)), use_jit)
    out = np.asarray(fn(jax.random.key(1), jnp.asarray(batch)))
    flipped = [np.array_equal(o, np.flip(one, axis)) for o in out]
    kept = [np.array_equal(o, one) for o in out]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_flip_p1_always_flips_both_ways():
    one, batch = _batch(n=4)
    out = np.asarray(A.augment(jax.random.key(2), jnp.asarray(batch), ("flip(p=1.0)",)))
    for o in out:
        np.testing.assert_array_equal(o, one[::-1, ::-1])


@JIT
@pytest.mark.parametrize(
    "fill,border_mode",
    [("reflect", cv2.BORDER_REFLECT_101), ("edge", cv2.BORDER_REPLICATE), ((10, 200, 30), None)],
)
def test_rotate_matches_cv2_warp_affine(use_jit, fill, border_mode):
    img = _smooth(40, 48)
    h, w = img.shape[:2]
    fn = _maybe_jit(lambda x, a: A.rotate_image(x, a, fill), use_jit)
    for angle in (33.0, -127.5, 90.0, 5.0):
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
        if border_mode is None:
            want = cv2.warpAffine(
                img,
                m,
                (w, h),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=fill,
            )
        else:
            want = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border_mode)
        got = np.asarray(fn(jnp.asarray(img), angle))
        diff = np.abs(got - want.astype(np.float32))
        # Away from the borders: within OpenCV's uint8 rounding and 5-bit fixed-point weights.
        assert diff[6:-6, 6:-6].max() <= 1.0, angle
        # Even at the borders the fill modes agree with OpenCV's.
        assert diff.max() <= 1.0, angle


def test_rotate_border_fill_is_the_median_ring_colour():
    img = _smooth(30, 30)
    img[0, :] = img[-1, :] = img[:, 0] = img[:, -1] = (50, 100, 150)
    m = cv2.getRotationMatrix2D((14.5, 14.5), 45, 1.0)
    want = cv2.warpAffine(
        img, m, (30, 30), borderMode=cv2.BORDER_CONSTANT, borderValue=(50, 100, 150)
    )
    got = np.asarray(jax.jit(lambda x: A.rotate_image(x, 45.0, "border"))(jnp.asarray(img)))
    assert np.abs(got - want).max() <= 1.0


def test_rotate_by_90_equals_rot90():
    img = _smooth(16, 16)
    got = np.asarray(A.rotate_image(jnp.asarray(img), 90.0))
    np.testing.assert_allclose(got, np.rot90(img, 1), atol=1e-3)


@JIT
def test_random_rotate_op_is_per_example_and_zero_angle_is_identity(use_jit):
    one, batch = _batch(n=8, size=16)
    fn = _maybe_jit(lambda r, x, ops: A.augment(r, x, ops), use_jit, static_argnums=2)
    same = np.asarray(fn(jax.random.key(3), jnp.asarray(batch), ("rotate(0)",)))
    np.testing.assert_allclose(same, np.broadcast_to(one, same.shape), atol=1e-3)
    out = np.asarray(fn(jax.random.key(3), jnp.asarray(batch), ("rotate(180)",)))
    assert out.dtype == np.float32 and out.shape == batch.shape
    assert len({o.tobytes() for o in out}) == len(out)
    again = np.asarray(fn(jax.random.key(3), jnp.asarray(batch), ("rotate(180)",)))
    np.testing.assert_array_equal(out, again)  # same key, same result


@JIT
def test_random_resized_crop_full_box_is_identity_and_crops_zoom_in(use_jit):
    one, batch = _batch(n=4, size=16)
    fn = _maybe_jit(lambda r, x, ops: A.augment(r, x, ops), use_jit, static_argnums=2)
    ident = fn(jax.random.key(4), jnp.asarray(batch), ("random_resized_crop((1, 1), (1, 1))",))
    np.testing.assert_allclose(np.asarray(ident), np.broadcast_to(one, batch.shape), atol=1e-3)
    # A half-area crop of a left-to-right ramp covers a narrower range of values.
    ramp = np.broadcast_to(np.linspace(0, 255, 16)[None, :, None], (16, 16, 3))
    ramps = jnp.asarray(np.broadcast_to(ramp, (4, 16, 16, 3)).astype(np.uint8))
    out = np.asarray(fn(jax.random.key(5), ramps, ("random_resized_crop((0.25, 0.25))",)))
    assert out.shape == (4, 16, 16, 3)
    spans = out[:, 8, -1, 0] - out[:, 8, 0, 0]
    assert np.all(spans < 0.8 * 255) and np.all(spans > 0)


def test_rgb_hsv_round_trip_matches_colorsys():
    rgb = np.random.default_rng(6).random((50, 3)).astype(np.float32)
    rgb[0] = (0.3, 0.3, 0.3)  # grey: hue 0
    rgb[1] = 0.0
    want = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    got = np.asarray(A.rgb_to_hsv(jnp.asarray(rgb)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    back = np.asarray(A.hsv_to_rgb(jnp.asarray(want, jnp.float32)))
    np.testing.assert_allclose(back, [colorsys.hsv_to_rgb(*p) for p in want], atol=1e-5)


@JIT
def test_hue_shift_matches_colorsys(use_jit):
    img = _smooth(6, 5)
    fn = _maybe_jit(lambda x: A.adjust_hsv(x, hue_delta=0.1, saturation_factor=0.7), use_jit)
    got = np.asarray(fn(jnp.asarray(img)))
    want = np.empty(img.shape, np.float64)
    for idx in np.ndindex(img.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(img[idx] / 255.0))
        want[idx] = colorsys.hsv_to_rgb((h + 0.1) % 1.0, s * 0.7, v)
    np.testing.assert_allclose(got, want * 255, atol=1e-3)


def test_colour_ops_stay_in_range_and_respect_bounds():
    _, batch = _batch(n=16, size=8)
    x = jnp.asarray(batch)
    b = np.asarray(A.augment(jax.random.key(7), x, ("brightness(0.1)",)))
    delta = b.astype(np.float64) - batch
    inside = (b > 0) & (b < 255)
    for d, m in zip(delta, inside, strict=True):  # one offset per image, |offset| <= 25.5
        assert np.ptp(d[m]) < 1e-3 and np.abs(d[m]).max() <= 25.5 + 1e-3
    c = np.asarray(A.augment(jax.random.key(8), x, ("contrast(0.5, 0.9)",)))
    assert np.all(c.std(axis=(1, 2)) < batch.std(axis=(1, 2)))
    for spec in ("hue(0.1)", "saturation(0.5, 1.5)", "brightness(0.5)", "contrast(0.1, 3)"):
        out = np.asarray(A.augment(jax.random.key(9), x, (spec,)))
        assert out.min() >= 0 and out.max() <= 255 and out.dtype == np.float32


def test_full_pipeline_uint8_output_and_determinism():
    _, batch = _batch(n=6, size=16)
    ops = (
        "rot90",
        "flip_lr",
        "flip_ud",
        'rotate(max_angle=180, fill="reflect")',
        "brightness(0.1)",
        "contrast",
        "hue(0.02)",
        "random_resized_crop",
    )
    fn = jax.jit(A.make_augment(ops, dtype=jnp.uint8))  # each op is also tested eagerly
    a = np.asarray(fn(jax.random.key(10), jnp.asarray(batch)))
    b = np.asarray(fn(jax.random.key(10), jnp.asarray(batch)))
    assert a.dtype == np.uint8 and a.shape == batch.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, np.asarray(fn(jax.random.key(11), jnp.asarray(batch))))


def test_empty_ops_is_identity():
    _, batch = _batch(n=2, size=4)
    np.testing.assert_array_equal(np.asarray(A.augment(jax.random.key(0), batch, ())), batch)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("rotat(30)", "Unknown augmentation op 'rotat'"),
        ("rotate(fill='mirror')", "fill must be"),
        ("rotate(angle=3)", "rotate"),
        ("rotate(30", "Cannot parse"),
        ("rotate(x)", "literals"),
        ("flip_lr(p=2)", "p must lie"),
        ("random_resized_crop((0, 1))", "scale"),
        ("os.system('ls')", "must look like"),
    ],
)
def test_bad_op_specs_raise_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        A.make_augment((spec,))


def test_rot90_needs_square_images():
    with pytest.raises(ValueError, match="square"):
        A.augment(jax.random.key(0), jnp.zeros((2, 4, 6, 3), jnp.uint8), ("rot90",))
