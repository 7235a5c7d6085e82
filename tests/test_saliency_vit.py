"""Explanations of ViTs against independent references, on a tiny timm ViT (random weights)
converted by our mapping:

- every block's attention probabilities equal timm's own (captured by hooks on `attn_drop`,
  as jacobgil's vit-explain does), and attention rollout equals those probabilities rolled
  out in plain numpy (Abnar & Zuidema 2020: 0.5 A + 0.5 I, multiplied first to last);
- Grad-CAM on the token grid equals pytorch-grad-cam 1.5.7 on timm's model with the usual
  ViT `reshape_transform` (class token dropped) at the same block;
- vanilla gradient, Integrated Gradients and Grad-CAM on tokens equal PAIR's `saliency`
  driven by the same jitted functions (the tests/test_saliency_pair.py pattern).
"""

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import saliency.core as pair
import torch  # conftest.py has imported torchvision before anything imports TensorFlow
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from saliency_fixtures import assert_close_to_reference, images, pair_call_model_function

from sipak_jax import model_io, saliency
from sipak_jax.conversions import vit as vit_conv
from sipak_jax.saliency import attention, gradients, integrated

SIZE, PATCH, DEPTH, CLASSES = 64, 8, 4, 5  # an 8x8 token grid; stages end after 1, 2, 3, 3 blocks


@pytest.fixture(scope="module")
def models():
    """(timm model with explicit attention, our ModelFunctions of its conversion)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    ref = VisionTransformer(
        img_size=SIZE, patch_size=PATCH, embed_dim=32, depth=DEPTH, num_heads=4, mlp_ratio=2.0,
        num_classes=CLASSES,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = 0.3 if name in ("cls_token", "pos_embed") or "qkv" in name else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)
    for block in ref.blocks:
        block.attn.fused_attn = False  # so that attn_drop sees the probabilities
    ref.eval()
    cfg = {"name": "vit", "image_size": SIZE, "patch_size": PATCH, "embed_dim": 32,
           "depth": DEPTH, "num_heads": 4, "mlp_dim": 64, "num_classes": CLASSES,
           "head": "token"}  # fmt: skip
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    flat = vit_conv.to_state("timm", tensors, model_io.abstract_model(cfg))
    model = model_io.model_with_weights(cfg, flat)
    return ref, saliency.ModelFunctions(model)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _timm_attention(ref, x):
    """[L, B, heads, T, T] attention probabilities timm computed (forward hooks)."""
    seen = []
    hooks = [
        b.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o)) for b in ref.blocks
    ]
    try:
        with torch.no_grad():
            logits = ref(_nchw(x)).numpy()
    finally:
        for h in hooks:
            h.remove()
    return np.stack([s.numpy() for s in seen]), logits


def _numpy_rollout(att, fusion):
    fused = {"mean": att.mean(2), "max": att.max(2)}[fusion].astype(np.float64)  # [L,B,T,T]
    t = fused.shape[-1]
    result = np.broadcast_to(np.eye(t), fused.shape[1:]).copy()
    for a in fused:
        a = a + np.eye(t)
        a = a / a.sum(-1, keepdims=True)
        result = a @ result
    return result[:, 0, 1:]


def test_logits_and_attention_equal_timms(models):
    ref, fns = models
    x = images(2, SIZE, seed=1)
    att, logits = _timm_attention(ref, x)
    assert_close_to_reference(fns.logits(x), logits)
    ours = np.asarray(fns.model().attention_weights(x))
    assert ours.shape == att.shape == (DEPTH, 2, 4, 65, 65)
    np.testing.assert_allclose(ours, att, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_rollout_equals_a_numpy_rollout_of_timms_attention(models, fusion):
    ref, fns = models
    x = images(2, SIZE, seed=2)
    att, _ = _timm_attention(ref, x)
    want = _numpy_rollout(att, fusion).reshape(2, 8, 8)
    result = saliency.explain(fns, x, "rollout", head_fusion=fusion)
    assert result.low_res.shape == (2, 8, 8) and result.maps.shape == (2, SIZE, SIZE)
    for i in range(2):
        assert_close_to_reference(result.low_res[i], want[i])
    assert np.ptp(want[0]) > 0.01 * want[0].max()  # not a flat map


def _block_of(stage):
    """The timm block whose output is our stage's grid (ends after 1, 2, 3, 3 blocks)."""
    ends = {1: 1, 2: 2, 3: 3, 4: DEPTH - 1}
    return ends[stage] - 1


@pytest.mark.parametrize("stage", [2, 4])
def test_gradcam_on_tokens_equals_pytorch_grad_cam(models, stage):
    ref, fns = models
    x = images(2, SIZE, seed=3)
    targets = np.array([1, 3])

    def reshape(t):  # the ViT reshape_transform of pytorch-grad-cam's tutorial
        return t[:, 1:, :].reshape(t.shape[0], 8, 8, t.shape[2]).permute(0, 3, 1, 2)

    class Recording(pgc.GradCAM):
        def get_cam_image(self, *args, **kwargs):
            self.raw = super().get_cam_image(*args, **kwargs)
            return self.raw

    layer = ref.blocks[_block_of(stage)]
    tgts = [ClassifierOutputTarget(int(t)) for t in targets]
    with Recording(model=ref, target_layers=[layer], reshape_transform=reshape) as cam:
        cam(input_tensor=_nchw(x), targets=tgts)
        want = np.maximum(cam.raw, 0)
    ours = saliency.explain(fns, x, "gradcam", target=targets, stage=stage)
    assert ours.low_res.shape == want.shape == (2, 8, 8)
    for i in range(2):
        assert_close_to_reference(ours.low_res[i], want[i])


def test_vanilla_gradient_and_ig_match_pair(models):
    _, fns = models
    x = images(1, SIZE, seed=4)[0]
    t = int(fns.predict(x[None])[0])
    call = pair_call_model_function(fns, t)
    ref = pair.GradientSaliency().GetMask(x.astype(np.float64), call)
    assert_close_to_reference(gradients.vanilla_gradient(fns, x[None], np.array([t]))[0], ref)
    ref_ig = pair.IntegratedGradients().GetMask(
        x.astype(np.float64), call, x_steps=10, batch_size=10
    )
    ours, _ = integrated.integrated_gradients(fns, x[None], np.array([t]), steps=10)
    assert_close_to_reference(ours[0], ref_ig)


@pytest.mark.parametrize("stage", [3])
def test_gradcam_on_tokens_matches_pair(models, stage):
    _, fns = models
    x = images(1, SIZE, seed=5)[0]
    t = int(fns.predict(x[None])[0])
    raw = pair.GradCam().GetMask(
        x.astype(np.float64),
        pair_call_model_function(fns, t, stage=stage),
        should_resize=False,
        three_dims=False,
    )
    ours = saliency.explain(fns, x[None], "gradcam", target=t, stage=stage)
    assert_close_to_reference(ours.low_res[0], raw)


def test_rollout_and_attention_head_refuse_models_without_them(models):
    from flax import nnx

    from sipak_jax.models import ResNet

    resnet = nnx.jit(lambda: ResNet(18, 2, width=4, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(0)))()
    with pytest.raises(ValueError, match="attention_weights"):
        attention.rollout(saliency.ModelFunctions(resnet), images(1, 32))
    _, fns = models
    with pytest.raises(ValueError, match="attention head"):
        saliency.explain(fns, images(1, SIZE), "attention_head")
