"""ConvNeXt weights from torchvision and timm give the reference framework's own logits.

Random weights, random LayerNorm affine parameters and random layer-scale values (the
libraries initialise layer scale to 1e-6, which would hide a wrong mapping of every residual
branch), saved to files, converted, and compared in float32, eval mode, to 1e-4 relative.
Tiny-width ConvNeXts run in seconds; the real ConvNeXt-T (CLI, both sources) is slow; small
and base are checked for names and shapes only (torch's meta device: no weights in memory).
"""

import numpy as np
import pytest

from sipak_jax import convert, model_io, preprocessing
from sipak_jax.conversions import ConversionError
from sipak_jax.conversions import convnext as cv
from tests.test_convert import _assert_close

TINY_DEPTHS, TINY_DIMS = (1, 1, 2, 1), (8, 16, 24, 32)


def _randomise(torch_model, seed=0):
    """Every 1-D parameter (LayerNorm affine, biases, layer scale) random around 1 or 0, so that
    a wrong mapping of any of them shows in the logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            scale = name.endswith(("layer_scale", "gamma")) or (
                name.endswith("weight") and p.ndim == 1
            )
            if scale:  # layer scale, LayerNorm weight
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.1)
    return torch_model.eval()


def _tiny_torchvision(num_classes=7, seed=0):
    import torch
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(seed)
    d, c = TINY_DEPTHS, TINY_DIMS
    setting = [CNBlockConfig(c[i], c[i + 1] if i < 3 else None, d[i]) for i in range(4)]
    return _randomise(ConvNeXt(setting, num_classes=num_classes, layer_scale=1e-6), seed)


def _tiny_timm(num_classes=7, seed=0):
    import torch
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(seed)
    model = ConvNeXt(depths=TINY_DEPTHS, dims=TINY_DIMS, num_classes=num_classes)
    return _randomise(model, seed)


def _images(n=2, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reference_logits(ref, images, mean, std):
    """The reference model's logits on (x/255 - mean) / std, the libraries' own transform."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return ref(x).numpy()


def _timm_norm(ref):
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=ref)
    return cfg["mean"], cfg["std"]


_TV_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's ConvNeXt transforms


def _ours(model, meta_or_spec, images):
    spec = getattr(meta_or_spec, "preprocessing", meta_or_spec)
    return np.asarray(model(preprocessing.normalize(images, spec)))


def _convert_tensors(source, tensors, path="file"):
    """The family module's own steps (what convert_file does after --arch picked it)."""
    cfg = cv.infer_config(source, tensors, path)
    flat = cv.to_state(source, tensors, model_io.abstract_model(cfg))
    model = model_io.model_with_weights(cfg, flat)
    model.eval()
    return model, cfg


def _numpy_state(torch_model):
    return {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}


# ---- Tiny widths: fast ------------------------------------------------------------------------


def test_tiny_torchvision_convnext_equals_torchvision():
    from torchvision.models.convnext import ConvNeXt as TvConvNeXt

    ref = _tiny_torchvision()
    assert isinstance(ref, TvConvNeXt)
    model, cfg = _convert_tensors("torchvision", _numpy_state(ref))
    assert cfg == {"name": "convnext", "depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32],
                   "num_classes": 7}  # fmt: skip
    images = _images()
    spec = preprocessing.spec_for("torchvision")
    _assert_close(_ours(model, spec, images), _reference_logits(ref, images, *_TV_NORM))


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_tiny_timm_convnext_from_file_equals_timm(suffix, tmp_path):
    import torch
    from safetensors.torch import save_file

    ref = _tiny_timm(seed=3)
    path = str(tmp_path / f"tiny{suffix}")
    if suffix == ".safetensors":
        save_file(ref.state_dict(), path)
    else:
        torch.save(ref.state_dict(), path)
    model, _ = _convert_tensors("timm", convert.read_torchvision(path), path)
    images = _images(seed=1)
    ours = _ours(model, preprocessing.spec_for("torchvision"), images)
    _assert_close(ours, _reference_logits(ref, images, *_timm_norm(ref)))
    # Headless (timm num_classes=0): the pooled, normalised features.
    ref.reset_classifier(0)
    headless, cfg = _convert_tensors("timm", _numpy_state(ref))
    assert cfg["num_classes"] == 0
    want = _reference_logits(ref, images, *_timm_norm(ref))
    _assert_close(_ours(headless, preprocessing.spec_for("torchvision"), images), want)


def test_features_and_classify_match_the_reference_stages():
    """Stage s of ours is torchvision's `features[2s-1]` output (the CAM family's layer)."""
    import torch

    ref = _tiny_torchvision(seed=5)
    model, _ = _convert_tensors("torchvision", _numpy_state(ref))
    images = _images(seed=4)
    x = preprocessing.normalize(images, preprocessing.spec_for("torchvision"))
    t = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
    with torch.no_grad():
        acts = [t := layer(t) for layer in ref.features]
    logits = np.asarray(model(x))
    for stage in range(1, 5):
        h = model.features(x, stage)
        _assert_close(np.asarray(h), acts[2 * stage - 1].permute(0, 2, 3, 1).numpy())
        np.testing.assert_allclose(np.asarray(model.classify(h, stage)), logits, atol=1e-5)


def test_every_mismatch_is_listed():
    tensors = _numpy_state(_tiny_torchvision())
    del tensors["features.5.1.block.3.bias"]
    tensors["features.9.0.block.0.weight"] = np.zeros((2,), np.float32)
    tensors["classifier.2.weight"] = np.zeros((7, 5), np.float32)
    cfg = cv.infer_config("torchvision", tensors, "f")
    with pytest.raises(ConversionError) as err:
        cv.to_state("torchvision", tensors, model_io.abstract_model(cfg))
    msg = str(err.value)
    assert "features.5.1.block.3.bias (for stage3/1/fc1/bias (96,))" in msg
    assert "features.9.0.block.0.weight (2,)" in msg
    assert "classifier.2.weight (7, 5) -> fc/kernel (32, 7)" in msg


# ---- The command line -------------------------------------------------------------------------


def test_cli_refuses_another_arch_and_unknown_names(tmp_path, capsys):
    import torch

    path = tmp_path / "tiny.pth"
    torch.save(_tiny_torchvision().state_dict(), path)
    out = tmp_path / "out"
    args = ["--source=torchvision", f"--input={path}", f"--output={out}"]
    assert convert.main([*args, "--arch=convnext_small"]) == 1
    err = capsys.readouterr().err
    assert "depths [1, 1, 2, 1]" in err and "not convnext_small" in err
    assert convert.main([*args, "--arch=convnext_huge"]) == 1
    assert "convnext_tiny" in capsys.readouterr().err  # the known names
    assert convert.main(["--source=timm", f"--input={path}", f"--output={out}"]) == 1
    assert "--arch" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "source, size",
    [
        ("torchvision", "small"),
        ("timm", "base"),
        pytest.param("torchvision", "base", marks=pytest.mark.slow),
        pytest.param("timm", "small", marks=pytest.mark.slow),
    ],
)
def test_small_and_base_names_and_shapes(source, size):
    """Every tensor of the real architecture's state dict has its place (shapes only)."""
    import timm
    import torch
    import torchvision

    with torch.device("meta"):
        if source == "timm":
            ref = timm.create_model(f"convnext_{size}", pretrained=False)
        else:
            ref = getattr(torchvision.models, f"convnext_{size}")()
    tensors = {
        k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()
    }
    cfg = cv.model_config(source, f"convnext_{size}", tensors, "meta")
    assert cfg == cv.ARCHS[(source, f"convnext_{size}")]
    abstract = model_io.abstract_model(cfg)
    state = cv.to_state(source, tensors, abstract)
    assert len(state) == len(tensors)
    n_ours = sum(int(np.prod(v.shape)) for v in state.values())
    assert n_ours == sum(p.numel() for p in ref.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_convnext_tiny_cli_equals_reference(source, tmp_path):
    import timm
    import torch
    import torchvision

    torch.manual_seed(11)
    if source == "timm":
        ref = _randomise(timm.create_model("convnext_tiny", pretrained=False), seed=11)
        path = tmp_path / "convnext_tiny-random.safetensors"
        from safetensors.torch import save_file

        save_file(ref.state_dict(), str(path))
        mean_std = _timm_norm(ref)
    else:
        ref = _randomise(torchvision.models.convnext_tiny(), seed=11)
        path = tmp_path / "convnext_tiny-random.pth"
        torch.save(ref.state_dict(), path)
        mean_std = _TV_NORM
    out = tmp_path / "dir"
    args = [f"--source={source}", "--arch=convnext_tiny", f"--input={path}", f"--output={out}"]
    assert convert.main(args) == 0
    model, meta = model_io.load_model_dir(out)
    assert meta.model == cv.ARCHS[(source, "convnext_tiny")]
    assert meta.source["arch"] == "convnext_tiny" and meta.source["framework"] == source
    assert meta.preprocessing["image_size"] == 224 and len(meta.class_names) == 1000
    images = _images(size=224, seed=2)
    ours, theirs = _ours(model, meta, images), _reference_logits(ref, images, *mean_std)
    _assert_close(ours, theirs)
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))
