"""Facts about the saliency methods that hold whatever the weights (see the saliency notes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from saliency_fixtures import images, tiny_model

from sipak_jax import saliency
from sipak_jax.saliency import cam, imageops


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def fns(model):
    return saliency.ModelFunctions(model)


def test_gradcam_hirescam_xgradcam_equal_cam_at_the_last_stage(fns, model):
    x = images(3, 64, seed=11)
    t = fns.predict(x)
    acts = np.asarray(fns.model().features(jnp.asarray(x), 4))
    w = np.asarray(model.fc.kernel[...])
    h, wd = acts.shape[1:3]
    cam_ref = np.maximum(np.einsum("bhwc,cb->bhw", acts, w[:, np.asarray(t)]), 0) / (h * wd)
    for kind in ("gradcam", "hirescam", "xgradcam"):
        got = np.asarray(cam.gradient_cam(fns, kind, x, t))
        np.testing.assert_allclose(got, cam_ref, rtol=1e-4, atol=1e-6 * cam_ref.max())


def test_cam_variants_differ_at_an_inner_stage(fns):
    x = images(2, 64, seed=12)
    t = fns.predict(x)
    g = np.asarray(cam.gradient_cam(fns, "gradcam", x, t, stage=3))
    h = np.asarray(cam.gradient_cam(fns, "hirescam", x, t, stage=3))
    assert g.shape == (2, 4, 4)
    assert not np.allclose(g, h, rtol=1e-3)


@pytest.mark.slow
def test_every_method_gives_finite_maps_of_the_input_size(fns):
    x = images(2, 32, seed=13)
    small = {
        "occlusion": {"size": 8, "stride": 8},
        "blur_ig": {"steps": 4},
        "ig": {"steps": 4},
        "xrai": {"ig_steps": 4},
        "smoothgrad": {"n_samples": 2},
        "smoothgrad_sq": {"n_samples": 2},
        "vargrad": {"n_samples": 2},
    }
    # rollout and attention_head need a ViT / the attention head (tests/test_saliency_vit.py);
    # on this plain ResNet they must refuse clearly.
    needs_attention = ("rollout", "attention_head")
    for name in needs_attention:
        with pytest.raises(ValueError, match="attention"):
            saliency.explain(fns, x, name, stage=2)
    for name in (m for m in saliency.METHODS if m not in needs_attention):
        r = saliency.explain(fns, x, name, stage=2, **small.get(name, {}))
        assert r.maps.shape == (2, 32, 32), name
        assert r.normalized.shape == (2, 32, 32), name
        assert np.all(np.isfinite(r.maps)) and np.all(np.isfinite(r.normalized)), name
        assert r.normalized.min() >= 0 and r.normalized.max() <= 1, name


def test_no_nan_on_an_all_negative_map():
    neg = -np.abs(np.random.default_rng(0).normal(size=(2, 8, 8))) - 1
    for kind in ("cam", "attribution"):
        out = saliency.normalize_maps(neg, kind)
        assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(saliency.normalize_maps(neg, "attribution"), 0)
    np.testing.assert_array_equal(saliency.normalize_maps(np.zeros((1, 4, 4)), "cam"), 0)


def test_cam_of_a_class_with_negative_evidence_everywhere_is_zero_not_nan():
    m = tiny_model(num_classes=2, seed=3)
    m.fc.kernel[...] = -jnp.abs(m.fc.kernel[...])  # activations >= 0: every CAM <= 0
    r = saliency.explain(m, images(2, 64, seed=14), "gradcam", target=0)
    assert np.all(np.isfinite(r.normalized))
    np.testing.assert_array_equal(r.maps, 0)
    np.testing.assert_array_equal(r.normalized, 0)


def test_batchnorm_runs_in_inference_mode(fns):
    x = images(4, 32, seed=15)
    t = fns.predict(x)
    alone = saliency.explain(fns, x[:1], "gradient", target=t[:1]).attributions
    in_batch = saliency.explain(fns, x, "gradient", target=t).attributions[:1]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-4, atol=1e-7)


def test_explaining_leaves_a_training_model_in_training_mode():
    m = tiny_model(seed=4)
    m.train()
    saliency.explain(m, images(1, 32), "gradcam", stage=2)
    assert m.bn1.use_running_average is False


def test_target_and_score_choices(fns):
    x = images(2, 32, seed=16)
    pred = np.asarray(fns.predict(x))
    r = saliency.explain(fns, x, "gradient")
    np.testing.assert_array_equal(r.target, pred)
    other = (pred + 1) % 5
    r2 = saliency.explain(fns, x, "gradient", target=other)
    np.testing.assert_array_equal(r2.target, other)
    assert not np.allclose(r.attributions, r2.attributions)
    # d softmax_c / dx = p_c (d z_c/dx - sum_k p_k d z_k/dx): check on one image against jax.
    xp = jnp.asarray(x[:1])
    c = int(pred[0])

    def prob(v):
        return jax.nn.softmax(fns.model()(v), axis=-1)[0, c]

    ref = np.asarray(jax.grad(prob)(xp))
    got = saliency.explain(fns, x[:1], "gradient", target=c, score="probability").attributions
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    with pytest.raises(ValueError, match="score"):
        saliency.explain(fns, x, "gradient", score="odds")
    with pytest.raises(ValueError, match="out of range"):
        saliency.explain(fns, x, "gradient", target=7)
    with pytest.raises(ValueError, match="unknown saliency method"):
        saliency.explain(fns, x, "guided_backprop")


def test_average_over_rotations_and_flips_is_invariant(fns):
    x = images(1, 32, seed=17)
    t = fns.predict(x)
    a = saliency.explain(fns, x, "gradient_x_input", target=t, average_transforms=True).maps
    xr = np.asarray(imageops.dihedral(jnp.asarray(x), 1, True))
    b = saliency.explain(fns, xr, "gradient_x_input", target=t, average_transforms=True).maps
    np.testing.assert_allclose(
        np.asarray(imageops.dihedral(jnp.asarray(a), 1, True)),
        b,
        rtol=1e-4,
        atol=1e-5 * np.abs(a).max(),
    )


def test_resize_matches_scikit_image_and_jax_image():
    from skimage.transform import resize

    m = np.random.default_rng(1).uniform(size=(7, 7)).astype(np.float32)
    ours = np.asarray(imageops.resize_maps(m[None], (64, 64), "skimage"))[0]
    np.testing.assert_allclose(ours, resize(m, (64, 64)), atol=5e-6)
    jx = np.asarray(imageops.resize_maps(m[None], (64, 64), "bilinear"))[0]
    np.testing.assert_allclose(jx, np.asarray(jax.image.resize(m, (64, 64), "bilinear")))


def test_blur_matrix_matches_scipy():
    from scipy import ndimage

    img = np.random.default_rng(2).normal(size=(1, 20, 17, 3))
    for sigma, mode in [(1.5, "constant"), (3.0, "reflect"), (7.3, "constant")]:
        ours = np.asarray(imageops.gaussian_blur(jnp.asarray(img, jnp.float32), sigma, mode))
        ref = ndimage.gaussian_filter(img[0], [sigma, sigma, 0], mode=mode)
        np.testing.assert_allclose(ours[0], ref, atol=1e-5)


def test_ig_baselines():
    from sipak_jax import preprocessing

    spec = preprocessing.spec_for("torchvision", image_size=32)
    u8 = np.full((1, 32, 32, 3), 200, np.uint8)
    u8[:, 10:20, 10:20] = 30
    x = np.asarray(preprocessing.normalize(u8, spec))
    from sipak_jax.saliency import integrated

    (black,) = integrated.make_baselines(x, "black", spec)
    np.testing.assert_allclose(
        black[0, 0, 0], preprocessing.normalize(np.zeros(3, np.uint8), spec), rtol=1e-6
    )
    (bg,) = integrated.make_baselines(x, "background", spec)
    np.testing.assert_allclose(bg[0, 15, 15], x[0, 0, 0], rtol=1e-6)  # the border colour
    assert len(integrated.make_baselines(x, "black_white", spec)) == 2
    with pytest.raises(ValueError, match="preprocessing spec"):
        integrated.make_baselines(x, "white")
