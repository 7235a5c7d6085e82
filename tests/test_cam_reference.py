"""The CAM family and VarGrad against real reference implementations on the same weights.

The reference side is a real torchvision ResNet (BasicBlock, one block per stage, 5 classes,
random weights and random BatchNorm statistics) explained by pytorch-grad-cam 1.5.7
(jacobgil's `grad-cam`, the library the CAM notes name) and by Captum's `NoiseTunnel`; our side
is the same `.pth` converted by `sipak_jax.convert` and explained by `sipak_jax.saliency`. Same
images (NCHW there, NHWC here), same target classes, same layer (`layer4`, the last stage, and
`layer3`).

Two levels are compared:
- raw: the CAM at the stage's resolution after the ReLU, before any normalisation (the
  reference's `get_cam_image`, recorded by a subclass that only keeps its return value, then
  the ReLU its `compute_cam_per_layer` applies) against our `Explanation.low_res`;
- shown: the reference's output (min-max, cv2 bilinear resize to the input, min-max again)
  against our `Explanation.normalized` with `resize="bilinear"`.
Tolerance: rtol 1e-4 plus 1e-5 of the map's maximum (the notes' tolerance for deterministic
methods); shown maps, in [0, 1], to 1e-5.
"""

import numpy as np
import pytest
import pytorch_grad_cam as pgc  # the reference (requirements-test.txt)
import torch  # conftest.py has imported torchvision before anything imports TensorFlow
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from saliency_fixtures import assert_close_to_reference, images

from sipak_jax import convert, saliency
from sipak_jax.saliency import cam, gradients, imageops

SIZE = 96  # layer4: 3x3, layer3: 6x6
NUM_CLASSES = 5
REFERENCE = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "hirescam": pgc.HiResCAM,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "scorecam": pgc.ScoreCAM,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(torchvision model, our ModelFunctions of its conversion)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    tv = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES)
    with torch.no_grad():  # BatchNorm statistics and affine parameters away from 0 and 1
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    tv.eval()
    path = tmp_path_factory.mktemp("tv") / "resnet_1111.pth"
    torch.save(tv.state_dict(), path)
    model, _ = convert.convert_file(str(path))
    return tv, saliency.ModelFunctions(model)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _reference(method, tv, stage, x, targets, target_type=ClassifierOutputTarget, **attrs):
    """pytorch-grad-cam on `tv`: (shown maps [B,H,W], raw CAM after its ReLU [B,h,w],
    activations and gradients [B,C,h,w] its hooks recorded)."""

    class Recording(REFERENCE[method]):
        def get_cam_image(self, *args, **kwargs):
            self.raw = super().get_cam_image(*args, **kwargs)
            return self.raw

    layer = getattr(tv, f"layer{stage}")
    tgts = [target_type(int(t)) for t in targets]
    with Recording(model=tv, target_layers=[layer]) as ref:
        for k, v in attrs.items():
            setattr(ref, k, v)
        shown = ref(input_tensor=_nchw(x), targets=tgts)
        hooks = ref.activations_and_grads
        acts = hooks.activations[0].numpy()
        grads = hooks.gradients[0].numpy() if hooks.gradients else None
        raw = np.maximum(ref.raw, 0)
    return shown, raw, acts, grads


def test_converted_model_gives_torchvisions_logits(models):
    tv, fns = models
    x = images(2, SIZE, seed=20)
    with torch.no_grad():
        want = tv(_nchw(x)).numpy()
    assert_close_to_reference(fns.logits(x), want)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"])
def test_gradient_cams_match_pytorch_grad_cam_at_the_last_stage(models, method):
    """Same definitions on both sides (Grad-CAM++: eq. 19 with pytorch-grad-cam's eps 1e-6
    in the denominator; XGradCAM: eps 1e-7). Two images, two different target classes."""
    tv, fns = models
    x = images(2, SIZE, seed=21)
    targets = np.array([1, 3])
    shown, raw, _, _ = _reference(method, tv, 4, x, targets)
    ours = saliency.explain(fns, x, method, target=targets, stage=4, resize="bilinear")
    assert ours.low_res.shape == raw.shape == (2, 3, 3)
    for i in range(2):  # per image: neither map may be empty (the test would prove nothing)
        assert_close_to_reference(ours.low_res[i], raw[i])
    np.testing.assert_allclose(ours.normalized, shown, atol=1e-5)


def test_gradient_cams_match_pytorch_grad_cam_at_an_inner_stage(models):
    """At layer3 (6x6) the variants differ from each other. The activations and gradients our
    `feature_gradients` gives are the reference hooks' own; each formula is then applied to
    ours (the path `explain` takes, `cam.gradient_cam`, is `cam_from_gradients` on them)."""
    tv, fns = models
    x = images(2, SIZE, seed=22)
    targets = np.array([0, 4])
    acts, grads, _ = fns.feature_gradients(x, targets, "logit", 3)
    maps = {}
    for method in cam.GRADIENT_CAMS:
        _, raw, ref_acts, ref_grads = _reference(method, tv, 3, x, targets)
        assert_close_to_reference(np.transpose(acts, (0, 3, 1, 2)), ref_acts)
        assert_close_to_reference(np.transpose(grads, (0, 3, 1, 2)), ref_grads)
        maps[method] = np.asarray(cam.cam_from_gradients(method, acts, grads))
        assert maps[method].shape == (2, 6, 6)
        for i in range(2):
            assert_close_to_reference(maps[method][i], raw[i])
    assert not np.allclose(maps["gradcam"], maps["hirescam"], rtol=1e-2)
    assert not np.allclose(maps["gradcam"], maps["gradcam++"], rtol=1e-2)


def test_probability_score_matches_the_softmax_target(models):
    """score='probability' is pytorch-grad-cam's `ClassifierOutputSoftmaxTarget`. Grad-CAM++
    is the check that matters: its weights are not invariant to the score's scale."""
    tv, fns = models
    x = images(2, SIZE, seed=23)
    targets = np.array([2, 2])
    shown, raw, _, _ = _reference(
        "gradcam++", tv, 4, x, targets, target_type=ClassifierOutputSoftmaxTarget
    )
    ours = saliency.explain(
        fns, x, "gradcam++", target=targets, stage=4, score="probability", resize="bilinear"
    )
    for i in range(2):
        assert_close_to_reference(ours.low_res[i], raw[i])
    np.testing.assert_allclose(ours.normalized, shown, atol=1e-5)


@pytest.mark.parametrize("stage", [4, 3])
def test_eigencam_matches_pytorch_grad_cam_up_to_the_sign_we_choose(models, stage):
    """Both project the centred activations on their first principal component. An SVD's sign
    is arbitrary: pytorch-grad-cam keeps LAPACK's, we flip the component so that the map
    correlates positively with the channel sum. So ours = ReLU(s * reference projection), s
    our rule computed on the reference's own activations; compared at the raw level."""
    tv, fns = models
    x = images(2, SIZE, seed=24)
    _, _, ref_acts, _ = _reference("eigencam", tv, stage, x, [0, 0])
    projection = get_2d_projection(ref_acts)  # the reference's EigenCAM, before its ReLU
    ours = saliency.explain(fns, x, "eigencam", stage=stage, resize="bilinear")
    for i in range(2):
        total = ref_acts[i].sum(axis=0)
        s = 1.0 if np.sum(projection[i] * (total - total.mean())) >= 0 else -1.0
        assert_close_to_reference(ours.low_res[i], np.maximum(s * projection[i], 0))


@pytest.mark.slow  # 512 masked forward passes per image on each side
def test_scorecam_matches_pytorch_grad_cam(models):
    """Same definition: channel maps upsampled by corner-aligned bilinear interpolation (torch's
    UpsamplingBilinear2d), min-max scaled (+1e-8), masking the input; weights the softmax over
    channels of the target's logit on the masked inputs."""
    tv, fns = models
    x = images(1, 64, seed=25)
    shown, raw, _, _ = _reference("scorecam", tv, 4, x, [3], batch_size=128)
    ours = saliency.explain(
        fns, x, "scorecam", target=3, stage=4, resize="bilinear", batch_size=256
    )
    assert_close_to_reference(ours.low_res, raw)
    np.testing.assert_allclose(ours.normalized, shown, atol=1e-5)


def test_align_corners_resize_matches_torch():
    m = np.random.default_rng(2).uniform(size=(2, 3, 4)).astype(np.float32)
    want = torch.nn.UpsamplingBilinear2d(size=(17, 29))(torch.from_numpy(m)[:, None])[:, 0]
    got = imageops.resize_maps(m, (17, 29), "align_corners")
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-6)


def test_vargrad_matches_captum_noise_tunnel_with_the_same_noise(models):
    """VarGrad = the variance over noisy copies of the input gradient of the target's logit
    (Captum: `NoiseTunnel(Saliency)`, nt_type='vargrad', abs=False). Captum draws its noise with
    one `torch.normal` call on the inputs repeated `nt_samples` times per image; seeding torch
    and making that call again replays it exactly, and our `smoothgrad(noise=...)` takes it.
    Captum computes E[g^2] - E[g]^2, we the mean squared deviation: equal up to float32
    cancellation, hence atol 1e-4 of the maximum."""
    from captum.attr import NoiseTunnel, Saliency

    tv, fns = models
    x = images(2, 32, seed=26)
    targets = np.array([1, 4])
    n, stdev = 8, 0.15 * float(x.max() - x.min())
    xt = _nchw(x)
    torch.manual_seed(7)
    ref = NoiseTunnel(Saliency(tv)).attribute(
        xt,
        nt_type="vargrad",
        nt_samples=n,
        stdevs=stdev,
        target=torch.from_numpy(targets),
        abs=False,
    )
    torch.manual_seed(7)
    expanded = (xt.shape[0] * n,) + tuple(xt.shape[1:])
    noise = torch.normal(0, torch.tensor(stdev).repeat(expanded)).numpy()
    noise = noise.reshape(2, n, 3, 32, 32).transpose(1, 0, 3, 4, 2)  # [n, B, H, W, C]
    ours = gradients.smoothgrad(fns, x, targets, kind="vargrad", noise=noise)
    assert_close_to_reference(ours, ref.detach().numpy().transpose(0, 2, 3, 1), atol_frac=1e-4)
