"""Our saliency methods against PAIR's `saliency` package (the reference implementation).

PAIR drives the same model through its `call_model_function` contract, served by the jitted
functions of our module (`ModelFunctions`); tolerances: rtol 1e-4, atol 1e-5 * max abs(ref)
(SmoothGrad 2e-3 * max).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import saliency.core as pair  # PAIR's reference library (requirements-test.txt)
from saliency_fixtures import (
    assert_close_to_reference,
    images,
    pair_call_model_function,
    tiny_model,
)

from sipak_jax import saliency
from sipak_jax.saliency import gradients, imageops, integrated, occlusion, xrai


@pytest.fixture(scope="module")
def fns():
    return saliency.ModelFunctions(tiny_model())


def _target(fns, x):
    return int(fns.predict(x[None])[0])


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_vanilla_gradient_matches_pair(fns, score):
    x = images(1, 32)[0]
    t = _target(fns, x)
    ref = pair.GradientSaliency().GetMask(
        x.astype(np.float64), pair_call_model_function(fns, t, score)
    )
    ours = gradients.vanilla_gradient(fns, x[None], jnp.array([t]), score)[0]
    assert_close_to_reference(ours, ref)


def test_integrated_gradients_matches_pair(fns):
    x = images(1, 32, seed=2)[0]
    t = _target(fns, x)
    call = pair_call_model_function(fns, t)
    ig = pair.IntegratedGradients()
    ref = ig.GetMask(x.astype(np.float64), call, x_steps=25, batch_size=25)
    ours, info = integrated.integrated_gradients(fns, x[None], jnp.array([t]), steps=25)
    assert_close_to_reference(ours[0], ref)
    # A non-zero baseline (a uniform grey image) too.
    base = np.full_like(x, 0.7)
    ref_b = ig.GetMask(
        x.astype(np.float64), call, x_baseline=base.astype(np.float64), x_steps=25, batch_size=25
    )
    ours_b, _ = integrated.integrated_gradients(
        fns, x[None], jnp.array([t]), baseline=base[None], steps=25
    )
    assert_close_to_reference(ours_b[0], ref_b)
    # The completeness gap we report is the one computed from the reference's own sum.
    delta = float(info["delta"][0])
    ref_gap = abs(ref.sum() - delta) / abs(delta)
    np.testing.assert_allclose(float(info["gap"][0]), ref_gap, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("magnitude,kind", [(True, "squared"), (False, "mean")])
def test_smoothgrad_matches_pair_with_replayed_noise(fns, magnitude, kind):
    x = images(1, 32, seed=3)[0]
    t = _target(fns, x)
    n = 6
    np.random.seed(123)  # noqa: NPY002 - PAIR draws from the global numpy generator
    ref = pair.GradientSaliency().GetSmoothedMask(
        x.astype(np.float64),
        pair_call_model_function(fns, t),
        stdev_spread=0.15,
        nsamples=n,
        magnitude=magnitude,
    )
    np.random.seed(123)  # noqa: NPY002 - PAIR draws from the global numpy generator
    noise = gradients.replay_numpy_noise(x.astype(np.float64), n, 0.15, np.random)
    ours = gradients.smoothgrad(fns, x[None], jnp.array([t]), kind=kind, noise=noise)[0]
    assert_close_to_reference(ours, ref, rtol=0, atol_frac=2e-3)


@pytest.mark.parametrize("stage", [4, 3])
def test_gradcam_matches_pair_raw_and_resized(fns, stage):
    x = images(1, 64, seed=4)[0]
    t = _target(fns, x)
    call = pair_call_model_function(fns, t, stage=stage)
    gc = pair.GradCam()
    raw = gc.GetMask(x.astype(np.float64), call, should_resize=False, three_dims=False)
    resized = gc.GetMask(x.astype(np.float64), call)  # divided by max, skimage resize, 3-D
    result = saliency.explain(fns, x[None], "gradcam", target=t, stage=stage)
    assert_close_to_reference(result.low_res[0], raw)
    low = result.low_res[0]
    ours_resized = imageops.resize_maps(jnp.asarray(low / low.max())[None], (64, 64))[0]
    assert_close_to_reference(np.repeat(np.asarray(ours_resized)[..., None], 3, -1), resized)
    # explain's raw map is the same resize of the unnormalised CAM.
    assert_close_to_reference(result.maps[0] / low.max(), resized[..., 0])


def test_blur_ig_matches_pair(fns):
    x = images(1, 32, seed=5)[0]
    t = _target(fns, x)
    ref = pair.BlurIG().GetMask(
        x.astype(np.float64),
        pair_call_model_function(fns, t),
        max_sigma=8,
        steps=20,
        batch_size=20,
    )
    ours = integrated.blur_ig(fns, x[None], jnp.array([t]), max_sigma=8, steps=20)[0]
    assert_close_to_reference(ours, ref)


def test_occlusion_matches_pair_on_a_small_input(fns):
    x = images(1, 16, seed=6)[0]
    t = _target(fns, x)
    ref = pair.Occlusion().GetMask(
        x.astype(np.float64), pair_call_model_function(fns, t), size=5, value=0.3
    )
    ours = occlusion.occlusion(fns, x[None], jnp.array([t]), size=5, value=0.3)[0]
    for c in range(3):  # PAIR writes the same value on every channel
        assert_close_to_reference(ours, ref[..., c])


def test_xrai_matches_pair_on_our_ig(fns):
    from saliency.core import xrai as pair_xrai

    x = images(1, 48, seed=7)[0]
    t = _target(fns, x)
    ig, _ = integrated.integrated_gradients(fns, x[None], jnp.array([t]), steps=16)
    ig = np.asarray(ig[0], np.float64)
    # Our segmentation is PAIR's (same scikit-image calls and settings).
    ref_masks = pair_xrai._get_segments_felzenszwalb(x.astype(np.float64))
    ours_masks = xrai.segments(x)
    assert len(ref_masks) == len(ours_masks) > 3
    np.testing.assert_array_equal(np.stack(ref_masks), ours_masks)
    ref = pair.XRAI().GetMask(
        x.astype(np.float64),
        pair_call_model_function(fns, t),
        base_attribution=ig,
        segments=ref_masks,
    )
    ours, ranks = xrai.xrai_from_attribution(ig, ours_masks)
    assert_close_to_reference(ours, ref)
    assert ranks.min() >= 1
