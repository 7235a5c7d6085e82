"""`sipak_jax.convert` on small real Keras and torchvision ResNets (the full ResNet-50/18
equivalence runs are in test_convert_equivalence.py, marked slow)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sipak_jax import convert, model_io, preprocessing

SIZE = 32  # tiny images: the conversion is resolution-independent


def _randomise_bn(torch_model, seed=0):
    """Random BatchNorm statistics and affine parameters, so that a wrong mapping of
    running_mean/var (or a wrong epsilon) shows in the logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in torch_model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return torch_model.eval()


@pytest.fixture(scope="module")
def tiny_torch(tmp_path_factory):
    """A real torchvision ResNet (bottleneck, one block per stage, 7 classes) saved as .pth."""
    import torch
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    model = _randomise_bn(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=7))
    path = tmp_path_factory.mktemp("torch") / "tiny_resnet.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


def _images(n=2, size=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _torch_logits(model, images_uint8):
    """torchvision's own preprocessing: ToTensor (x/255) + Normalize(ImageNet mean, std),
    with the mean/std of torchvision's ResNet50_Weights transforms."""
    import torch
    from torchvision.models import ResNet50_Weights
    from torchvision.transforms.functional import normalize

    tf = ResNet50_Weights.IMAGENET1K_V1.transforms()
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
    x = normalize(x, tf.mean, tf.std)
    with torch.no_grad():
        return model(x).numpy()


def _flax_logits(model, meta, images_uint8):
    x = preprocessing.normalize(images_uint8, meta.preprocessing)
    return np.asarray(model(x))


def _assert_close(ours, ref, rtol=1e-4):
    scale = float(np.max(np.abs(ref)))
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * scale)


def test_imagenet_class_names_equal_torchvision():
    from torchvision.models import ResNet50_Weights

    from sipak_jax.models.imagenet_classes import IMAGENET_CLASS_NAMES

    assert list(IMAGENET_CLASS_NAMES) == ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def test_torchvision_pth_and_safetensors_convert_to_the_same_logits(tiny_torch, tmp_path):
    from safetensors.torch import save_file

    torch_model, pth = tiny_torch
    model, meta = convert.convert_file(pth)
    assert isinstance(meta, model_io.ModelMetadata) and meta.kind == "converted"
    assert meta.model == {
        "variant": "v1.5",
        "width": 64,
        "num_classes": 7,
        "depth": 50,
        "stage_sizes": [1, 1, 1, 1],
    }
    assert meta.preprocessing == preprocessing.spec_for("torchvision", 224, "stretch")
    assert meta.class_names == tuple(f"class_{i}" for i in range(7))
    assert meta.taxonomy.abnormal == () and meta.taxonomy.readings == {}
    assert meta.source["sha256"] == convert.file_digest(pth)
    images = _images()
    _assert_close(_flax_logits(model, meta, images), _torch_logits(torch_model, images))

    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(st))
    model2, _ = convert.convert_file(str(st))
    a = model_io.flatten(model_io.weights_state(model))
    b = model_io.flatten(model_io.weights_state(model2))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def _write_state(path, state):
    import torch

    torch.save(state, path)
    return str(path)


def test_strict_merge_lists_every_unmatched_missing_and_misshaped_tensor(tiny_torch, tmp_path):
    import torch

    sd = dict(torch.load(tiny_torch[1], weights_only=True))
    sd["layer5.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)  # no place in the model
    del sd["layer2.0.bn2.running_var"]  # the model needs it
    sd["layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)  # wrong shape
    with pytest.raises(convert.ConversionError) as err:
        convert.convert_file(_write_state(tmp_path / "bad.pth", sd))
    msg = str(err.value)
    assert "bad.pth" in msg
    assert "layer5.0.conv1.weight" in msg
    assert "layer2.0.bn2.running_var" in msg
    assert "layer3.0.conv2.weight (256, 256, 1, 1)" in msg


class _Payload:
    """Unpickling this object would create a marker file (code execution)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pth_is_refused_and_runs_nothing(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "resnet_evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": _Payload(str(marker))}, path)
    with pytest.raises(convert.ConversionError, match="Refused to load .*resnet_evil.pth"):
        convert.convert_file(str(path))
    assert not marker.exists()
    # The payload is real: an unrestricted unpickle (in a child process) does run it.
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120)
    assert marker.exists()


# --- Keras -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory):
    """A real Keras applications ResNet (v1 bottleneck blocks, the layer names of ResNet50, one
    block per stage, 7 classes; Keras fixes the stem at 64 channels, so the stages keep
    ResNet-50's widths) with random weights and BN statistics, saved in the
    legacy HDF5 layout by Keras's own legacy writer."""
    os.environ.setdefault("KERAS_BACKEND", "jax")  # no TensorFlow needed for the reference
    import h5py
    import keras
    from keras.src.applications import resnet as kr
    from keras.src.legacy.saving import legacy_h5_format

    def stack_fn(x):
        x = kr.stack_residual_blocks_v1(x, 64, 1, stride1=1, name="conv2")
        x = kr.stack_residual_blocks_v1(x, 128, 1, name="conv3")
        x = kr.stack_residual_blocks_v1(x, 256, 1, name="conv4")
        return kr.stack_residual_blocks_v1(x, 512, 1, name="conv5")

    keras.utils.set_random_seed(0)
    model = kr.ResNet(
        stack_fn,
        False,
        True,
        name="tiny",
        weights=None,
        input_shape=(SIZE, SIZE, 3),
        classes=7,
        classifier_activation=None,
    )
    _randomise_keras(model)
    path = tmp_path_factory.mktemp("keras") / "tiny_resnet.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return model, str(path)


def _randomise_keras(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if type(layer).__name__ == "BatchNormalization":
            n = weights[0].shape[0]
            gamma, beta = rng.uniform(0.5, 1.5, n), rng.uniform(-0.2, 0.2, n)
            mean, var = rng.uniform(-0.5, 0.5, n), rng.uniform(0.5, 2.0, n)
            layer.set_weights([w.astype(np.float32) for w in (gamma, beta, mean, var)])
        elif len(weights) == 2:  # conv / dense: random biases too (Keras initialises them to 0)
            bias = rng.uniform(-0.1, 0.1, weights[1].shape).astype(np.float32)
            layer.set_weights([weights[0], bias])


def _keras_logits(model, images_uint8):
    """Keras's own preprocessing: keras.applications.resnet50.preprocess_input (caffe)."""
    from keras.applications.resnet50 import preprocess_input

    x = preprocess_input(images_uint8.astype(np.float32))
    return np.asarray(model(x, training=False))


def test_keras_legacy_h5_converts_to_the_same_logits(tiny_keras, tmp_path):
    keras_model, path = tiny_keras
    model, meta = convert.convert_file(path)
    assert meta.model["variant"] == "v1" and meta.model["stage_sizes"] == [1, 1, 1, 1]
    assert meta.preprocessing == preprocessing.spec_for("keras", 224, "stretch")
    images = _images(seed=1)
    _assert_close(_flax_logits(model, meta, images), _keras_logits(keras_model, images))

    # A whole-model legacy .h5 (`model.save("x.h5")`) holds the same weights.
    full = tmp_path / "full_model.h5"
    keras_model.save(str(full))
    model2, _ = convert.convert_file(str(full))
    a = model_io.flatten(model_io.weights_state(model))
    b = model_io.flatten(model_io.weights_state(model2))
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)

    # Keras 3's own `.weights.h5` layout names layers by class: refused with directions.
    k3 = tmp_path / "tiny.weights.h5"
    keras_model.save_weights(str(k3))
    with pytest.raises(convert.ConversionError, match="Keras 3"):
        convert.convert_file(str(k3))


def test_keras_file_missing_a_layer_is_an_error_naming_it(tiny_keras, tmp_path):
    import shutil

    import h5py

    path = tmp_path / "cut.h5"
    shutil.copy(tiny_keras[1], path)
    with h5py.File(path, "a") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        assert "conv3_block1_0_bn" in names
        f.attrs["layer_names"] = [n.encode() for n in names if n != "conv3_block1_0_bn"]
    with pytest.raises(convert.ConversionError, match="conv3_block1_0_bn/moving_variance"):
        convert.convert_file(str(path))


# --- Command line, model DIRs ------------------------------------------------------------------


def test_command_line_writes_a_model_dir_that_loads(tiny_torch, tmp_path, capsys):
    torch_model, pth = tiny_torch
    out = tmp_path / "dir"
    assert convert.main(["--source=torchvision", f"--input={pth}", f"--output={out}"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format"] == "sipak_jax.model/2" and meta["kind"] == "converted"
    assert meta["source"]["framework"] == "torchvision"
    assert meta["source"]["file"] == "tiny_resnet.pth"
    assert meta["taxonomy"]["class_names"] == [f"class_{i}" for i in range(7)]
    model, loaded_meta = model_io.load_model_dir(out)
    assert loaded_meta == convert.convert_file(pth)[1]
    images = _images(seed=2)
    _assert_close(_flax_logits(model, loaded_meta, images), _torch_logits(torch_model, images))

    # Never overwrite what is there unless told.
    before = (out / "metadata.json").read_text()
    assert convert.main(["--source=torchvision", f"--input={pth}", f"--output={out}"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metadata.json").read_text() == before
    args = ["--source=torchvision", f"--input={pth}", f"--output={out}", "--overwrite"]
    assert convert.main(args) == 0

    # A source/extension mismatch is refused.
    assert convert.main(["--source=keras", f"--input={pth}", f"--output={tmp_path / 'x'}"]) == 1


def test_download_fetches_checks_the_hash_and_caches(tiny_torch, tmp_path, monkeypatch):
    """The download path against a local file:// "server", never the network."""
    import shutil

    digest = convert.file_digest(tiny_torch[1])
    name = f"resnet50-{digest[:8]}.pth"  # torchvision's naming: the SHA-256 prefix
    server = tmp_path / "server"
    server.mkdir()
    shutil.copy(tiny_torch[1], server / name)
    bad_name = "resnet50-00000000.pth"
    shutil.copy(tiny_torch[1], server / bad_name)
    monkeypatch.setattr(convert, "TORCHVISION_URL", server.as_uri() + "/")
    monkeypatch.setitem(convert.TORCHVISION_FILES, name, 256)
    monkeypatch.setitem(convert.TORCHVISION_FILES, bad_name, 256)
    cache = tmp_path / "cache"

    # Offline (no --download): the error says what to fetch and where to put it.
    with pytest.raises(FileNotFoundError) as err:
        convert.resolve_input(name, cache_dir=str(cache))
    assert server.as_uri() + "/" + name in str(err.value)
    assert str(cache / name) in str(err.value)

    got = convert.resolve_input(name, download=True, cache_dir=str(cache))
    assert got == str(cache / name) and os.path.isfile(got)
    os.remove(server / name)  # now served from the cache
    assert convert.resolve_input(name, cache_dir=str(cache)) == got

    with pytest.raises(convert.ConversionError, match="SHA-256"):
        convert.resolve_input(bad_name, download=True, cache_dir=str(cache))

    out = tmp_path / "converted"
    args = [
        "--source=torchvision",
        f"--input={name}",
        f"--output={out}",
        "--download",
        f"--cache_dir={cache}",
    ]
    assert convert.main(args) == 0
    meta = model_io.read_metadata(out)
    assert meta.source["url"].endswith(name)
    assert meta.source["eval_transform"].startswith("resize shorter side to 256")


def test_official_names_and_addresses():
    assert convert.official_url("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5") == (
        "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
    assert convert.official_url("resnet50-11ad3fa6.pth") == (
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    )
    # Every torchvision ImageNet file this module knows (ResNets, ConvNeXts) is one torchvision
    # publishes, with the evaluation resize torchvision gives it.
    from torchvision.models import convnext, resnet

    weights = [
        w for n in ("18", "34", "50", "101", "152") for w in getattr(resnet, f"ResNet{n}_Weights")
    ] + [
        w
        for n in ("Tiny", "Small", "Base", "Large")
        for w in getattr(convnext, f"ConvNeXt_{n}_Weights")
    ]
    assert {convert.official_url(n) for n in convert.TORCHVISION_FILES} == {w.url for w in weights}
    for w in weights:
        name = w.url.rsplit("/", 1)[1]
        assert convert.TORCHVISION_FILES[name] == w.transforms().resize_size[0], name


def test_init_from_a_raw_weights_file_loads_the_backbone_and_keeps_the_head(tiny_torch):
    """`pretrained.init_from` on a .pth: converted on the fly, every backbone tensor equal to
    the torch model's (transposed), the new 3-class head untouched."""
    from flax import nnx

    from sipak_jax import pretrained
    from sipak_jax.models import ResNet

    torch_model, pth = tiny_torch
    model = ResNet(50, 3, width=64, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    head = np.asarray(model.fc.kernel[...])
    summary = pretrained.init_from(model, pth)
    assert sorted(summary["kept"]) == ["fc/bias", "fc/kernel"]
    assert summary["metadata"].source["file"] == "tiny_resnet.pth"
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), head)
    sd = torch_model.state_dict()
    np.testing.assert_array_equal(
        np.asarray(model.layer3[0].conv2.kernel[...]),
        sd["layer3.0.conv2.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(model.layer4[0].bn3.var[...]), sd["layer4.0.bn3.running_var"].numpy()
    )
    with pytest.raises(FileNotFoundError, match="not found"):
        pretrained.init_from(model, pth + ".missing.pth")
