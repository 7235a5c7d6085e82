"""Saliency on a ConvNeXt against the references: PAIR's `saliency` (Grad-CAM, vanilla
gradient, Integrated Gradients, driven through its `call_model_function` by our jitted
functions) and pytorch-grad-cam on the torchvision ConvNeXt the model was converted from
(same weights, random layer scale and LayerNorm parameters). Tolerances as in
tests/test_saliency_pair.py and tests/test_cam_reference.py."""

import jax.numpy as jnp
import numpy as np
import pytest
import saliency.core as pair  # PAIR's reference library (requirements-test.txt)
import torch  # conftest.py has imported torchvision before anything imports TensorFlow
from saliency_fixtures import assert_close_to_reference, images, pair_call_model_function

from sipak_jax import saliency
from sipak_jax.saliency import gradients, integrated
from tests.test_convert_convnext import _convert_tensors, _numpy_state, _tiny_torchvision

SIZE = 96  # stage 4: 3x3, stage 3: 6x6, stage 2: 12x12


@pytest.fixture(scope="module")
def models():
    """(torchvision ConvNeXt, ModelFunctions of its conversion)."""
    tv = _tiny_torchvision(num_classes=5, seed=7)
    model, _ = _convert_tensors("torchvision", _numpy_state(tv))
    return tv, saliency.ModelFunctions(model)


def _target(fns, x):
    return int(fns.predict(x[None])[0])


@pytest.mark.parametrize("stage", [4, 2])
def test_gradcam_matches_pair(models, stage):
    _, fns = models
    x = images(1, SIZE, seed=4)[0]
    t = _target(fns, x)
    call = pair_call_model_function(fns, t, stage=stage)
    raw = pair.GradCam().GetMask(x.astype(np.float64), call, should_resize=False, three_dims=False)
    ours = saliency.explain(fns, x[None], "gradcam", target=t, stage=stage)
    assert ours.low_res.shape[1:] == raw.shape == ((3, 3) if stage == 4 else (12, 12))
    assert_close_to_reference(ours.low_res[0], raw)


def test_vanilla_gradient_and_integrated_gradients_match_pair(models):
    _, fns = models
    x = images(1, SIZE, seed=5)[0]
    t = _target(fns, x)
    call = pair_call_model_function(fns, t)
    ref = pair.GradientSaliency().GetMask(x.astype(np.float64), call)
    ours = gradients.vanilla_gradient(fns, x[None], jnp.array([t]), "logit")[0]
    assert_close_to_reference(ours, ref)
    ref = pair.IntegratedGradients().GetMask(x.astype(np.float64), call, x_steps=16, batch_size=16)
    ours, _ = integrated.integrated_gradients(fns, x[None], jnp.array([t]), steps=16)
    assert_close_to_reference(ours[0], ref)


@pytest.mark.parametrize("stage", [4, 3])
def test_gradcam_matches_pytorch_grad_cam_on_the_torchvision_model(models, stage):
    """Stage s is torchvision's `features[2s - 1]` (the stage's last block): the layer a
    pytorch-grad-cam user picks for ConvNeXt."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    tv, fns = models
    x = images(2, SIZE, seed=6)
    targets = np.array([1, 3])

    class Recording(pgc.GradCAM):
        def get_cam_image(self, *args, **kwargs):
            self.raw = super().get_cam_image(*args, **kwargs)
            return self.raw

    nchw = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
    with Recording(model=tv, target_layers=[tv.features[2 * stage - 1]]) as ref:
        shown = ref(input_tensor=nchw, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        raw = np.maximum(ref.raw, 0)
    ours = saliency.explain(fns, x, "gradcam", target=targets, stage=stage, resize="bilinear")
    for i in range(2):
        assert_close_to_reference(ours.low_res[i], raw[i])
    np.testing.assert_allclose(ours.normalized, shown, atol=1e-5)


def test_model_randomisation_cascade_covers_every_convnext_parameter(models):
    """The sanity check's cascade (Adebayo et al.) for a ConvNeXt re-initialises, level by
    level, every parameter group of the model and nothing else."""
    from flax import nnx

    from sipak_jax import model_io
    from sipak_jax.saliency import metrics

    _, fns = models
    cascade = metrics.cascade_for(fns.model())
    assert cascade == metrics.CONVNEXT_CASCADE
    tops = {p.split("/")[0] for p in model_io.flatten(nnx.to_pure_dict(nnx.state(fns.model())))}
    assert tops == {n for _, names in cascade for n in names} - {"attention_pool"}
    before = model_io.flatten(nnx.to_pure_dict(fns.state))
    after = model_io.flatten(nnx.to_pure_dict(metrics.randomized_state(fns, ("stage4", "down4"))))
    changed = {p.split("/")[0] for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {"stage4", "down4"}
    assert np.all(np.asarray(after["stage4/0/layer_scale"]) == 1.0)
