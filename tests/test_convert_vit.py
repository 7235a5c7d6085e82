"""ViT weights from torchvision and timm give those libraries' own logits (float32, eval mode,
random weights): the real architectures through the `python -m sipak_jax.convert` entry
point (slow), tiny ones through the same mapping, and the position-embedding resampling of
another image size against timm's and torchvision's own."""

import numpy as np
import pytest
import torchvision  # noqa: F401 - before anything imports TensorFlow (docs: stack.md)

from sipak_jax import convert, model_io, preprocessing
from sipak_jax.conversions import vit as vit_conv
from sipak_jax.models import posembed


def _randomise(model, seed):
    """Every parameter moved away from its initial value (zero heads and class tokens would
    hide a wrong mapping), LayerNorm scales around 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1.0 + noise * 2)
            else:
                p.add_(noise)
    return model.eval()


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _torch_logits(model, images_u8, mean, std):
    import torch

    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        return model(x).numpy()


IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
INCEPTION = ([0.5] * 3, [0.5] * 3)


def _ours(model, spec, images_u8):
    return np.asarray(model(preprocessing.normalize(images_u8, spec)))


def _assert_close(ours, ref, rtol=1e-4):
    scale = float(np.max(np.abs(ref)))
    assert scale > 0
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * scale)


def _from_tensors(source, tensors, cfg):
    """Our model of `cfg` from a state dict through the conversion mapping."""
    abstract = model_io.abstract_model(cfg)
    flat = vit_conv.to_state(source, tensors, abstract)
    model = model_io.model_with_weights(cfg, flat)
    model.eval()
    return model


def _numpy_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


# ---- position-embedding resampling ---------------------------------------------------------


@pytest.mark.parametrize("old,new", [(14, 12), (14, 24), (14, 4), (4, 7), (3, 1)])
def test_resampling_equals_torch_interpolate_in_both_styles(old, new):
    import torch
    import torch.nn.functional as F

    grid = np.random.default_rng(old * new).normal(size=(old, old, 6)).astype(np.float32)
    t = torch.from_numpy(grid).permute(2, 0, 1)[None]
    for style, kw in [
        ("timm", {"antialias": True, "align_corners": False}),
        ("torchvision", {"align_corners": True}),
    ]:
        ref = F.interpolate(t, size=(new, new), mode="bicubic", **kw)[0].permute(1, 2, 0)
        ours = posembed.resample_grid(grid, (new, new), style)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=2e-5)


def test_resampling_keeps_the_class_token_and_equals_timms_own():
    import torch
    from timm.layers import resample_abs_pos_embed

    pos = np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
    ref = resample_abs_pos_embed(torch.from_numpy(pos), [12, 12], num_prefix_tokens=1)
    ours = posembed.resample_pos_embed(pos, (12, 12), "timm")
    np.testing.assert_array_equal(ours[:, 0], pos[:, 0])
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=2e-5)


# ---- tiny models through the same mapping (fast) --------------------------------------------

TINY = {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}


def _tiny_cfg(image_size, num_classes=7):
    return {"name": "vit", "image_size": image_size, **TINY, "num_classes": num_classes,
            "head": "token"}  # fmt: skip


def _tiny_torchvision(image_size, seed=0):
    import torch
    from torchvision.models import VisionTransformer

    torch.manual_seed(seed)
    ref = VisionTransformer(
        image_size=image_size, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
        mlp_dim=64, num_classes=7,
    )  # fmt: skip
    return _randomise(ref, seed)


def test_tiny_torchvision_vit_and_its_interpolate_embeddings():
    from torchvision.models.vision_transformer import interpolate_embeddings

    ref = _tiny_torchvision(64)
    tensors = _numpy_state(ref)
    images = _images(3, 64)
    model = _from_tensors("torchvision", tensors, _tiny_cfg(64))
    spec = preprocessing.spec_for("torchvision", 64)
    _assert_close(_ours(model, spec, images), _torch_logits(ref, images, *IMAGENET))

    # 64 px weights on a 96 px model: torchvision's own interpolate_embeddings vs ours.
    big = _tiny_torchvision(96)
    big.load_state_dict(interpolate_embeddings(96, 16, ref.state_dict()))
    big.eval()
    model96 = _from_tensors("torchvision", tensors, _tiny_cfg(96))
    images96 = _images(2, 96, seed=1)
    spec96 = preprocessing.spec_for("torchvision", 96)
    _assert_close(_ours(model96, spec96, images96), _torch_logits(big, images96, *IMAGENET))


def _tiny_timm(image_size, seed=0):
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    ref = VisionTransformer(
        img_size=image_size, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        num_classes=7,
    )  # fmt: skip
    return _randomise(ref, seed)


def test_tiny_timm_vit_and_its_resampled_position_embeddings():
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = _tiny_timm(64)
    tensors = _numpy_state(ref)
    images = _images(3, 64, seed=2)
    model = _from_tensors("timm", tensors, _tiny_cfg(64))
    spec = vit_conv.preprocessing("timm", "vit_small_patch16_224")
    spec = dict(spec, image_size=64)
    _assert_close(_ours(model, spec, images), _torch_logits(ref, images, *INCEPTION))

    # timm loads 64 px weights into a 48 px model through its own checkpoint filter
    # (resample_abs_pos_embed); our mapping resamples the same way.
    small = _tiny_timm(48, seed=1)
    small.load_state_dict(checkpoint_filter_fn(ref.state_dict(), small))
    small.eval()
    model48 = _from_tensors("timm", tensors, _tiny_cfg(48))
    images48 = _images(2, 48, seed=3)
    _assert_close(
        _ours(model48, dict(spec, image_size=48), images48),
        _torch_logits(small, images48, *INCEPTION),
    )


def test_a_wrong_file_lists_every_mismatch():
    ref = _tiny_timm(64)
    tensors = _numpy_state(ref)
    del tensors["blocks.1.attn.qkv.weight"]
    tensors["blocks.1.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(convert.ConversionError) as e:
        _from_tensors("timm", tensors, _tiny_cfg(64))
    msg = str(e.value)
    assert "blocks.1.attn.qkv.weight" in msg and "blocks.1.extra.weight" in msg
    # A model with an attention head: no file holds one; named, not a KeyError.
    with pytest.raises(convert.ConversionError, match="attention_pool/score/kernel"):
        _from_tensors("timm", _numpy_state(ref), dict(_tiny_cfg(64), head="attention"))


# ---- the real architectures through the CLI (slow) ------------------------------------------


def _convert_cli(tmp_path, source, arch, path):
    out = tmp_path / "dir"
    argv = [f"--source={source}", f"--arch={arch}", f"--input={path}", f"--output={out}"]
    assert convert.main(argv) == 0
    return model_io.load_model_dir(out)


@pytest.mark.slow
def test_torchvision_vit_b_16_pth(tmp_path):
    import torch

    torch.manual_seed(0)
    ref = _randomise(torchvision.models.vit_b_16(), 0)
    path = tmp_path / "vit_b_16-random.pth"
    torch.save(ref.state_dict(), path)
    model, meta = _convert_cli(tmp_path, "torchvision", "vit_b_16", path)
    assert meta.model == vit_conv.ARCHS[("torchvision", "vit_b_16")]
    assert meta.class_names[0] == "tench"
    images = _images(2, 224, seed=4)
    ours = _ours(model, meta.preprocessing, images)
    _assert_close(ours, _torch_logits(ref, images, *IMAGENET))


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,suffix", [("vit_small_patch16_224", ".safetensors"), ("vit_base_patch16_224", ".bin")]
)
def test_timm_vit(tmp_path, arch, suffix):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = _randomise(timm.create_model(arch, pretrained=False), 1)
    path = tmp_path / f"{arch}{suffix}"
    if suffix == ".safetensors":
        save_file(ref.state_dict(), str(path))
    else:
        torch.save(ref.state_dict(), path)
    model, meta = _convert_cli(tmp_path, "timm", arch, path)
    assert meta.model == vit_conv.ARCHS[("timm", arch)]
    assert meta.preprocessing["mean"] == [127.5] * 3
    images = _images(2, 224, seed=5)
    _assert_close(_ours(model, meta.preprocessing, images), _torch_logits(ref, images, *INCEPTION))
    if arch != "vit_small_patch16_224":
        return
    # The same 224 px weights on a 192 px model: timm's own model at img_size=192, loaded
    # through its checkpoint filter (resample_abs_pos_embed), against ours.
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref192 = timm.create_model(arch, pretrained=False, img_size=192)
    ref192.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ref192))
    ref192.eval()
    cfg = dict(meta.model, image_size=192)
    from safetensors.numpy import load_file

    model192 = _from_tensors("timm", load_file(str(path)), cfg)
    images192 = _images(2, 192, seed=6)
    spec = dict(meta.preprocessing, image_size=192)
    _assert_close(_ours(model192, spec, images192), _torch_logits(ref192, images192, *INCEPTION))
