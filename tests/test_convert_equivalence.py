"""Converted weights give the source framework's outputs: real Keras ResNet50 and torchvision
ResNet-50/18 with random weights AND random BatchNorm statistics, each side fed with its own
preprocessing of the same uint8 images. Slow: full-size networks on a CPU."""

import os

import h5py
import numpy as np
import pytest

from sipak_jax import convert, model_io, preprocessing
from tests.test_convert import (
    _assert_close,
    _flax_logits,
    _randomise_bn,
    _randomise_keras,
    _torch_logits,
)

pytestmark = pytest.mark.slow
SIZE = 224


def _images(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet(depth, tmp_path):
    import torch
    import torchvision

    torch.manual_seed(depth)
    ref = _randomise_bn(getattr(torchvision.models, f"resnet{depth}")(), seed=depth)
    path = tmp_path / f"resnet{depth}-random.pth"
    torch.save(ref.state_dict(), path)
    out = tmp_path / "dir"
    assert convert.main(["--source=torchvision", f"--input={path}", f"--output={out}"]) == 0
    model, meta = model_io.load_model_dir(out)
    assert meta.model == {"variant": "v1.5", "width": 64, "num_classes": 1000, "depth": depth}
    assert len(meta.class_names) == 1000 and meta.class_names[0] == "tench"
    assert meta.taxonomy.dataset == "imagenet" and meta.taxonomy.abnormal == ()
    assert meta.taxonomy.readings == {}
    images = _images(seed=depth)
    ours, theirs = _flax_logits(model, meta, images), _torch_logits(ref, images)
    _assert_close(ours, theirs)
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_keras_resnet50_top_and_notop(tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    from tests.test_convert import _keras_logits

    keras.utils.set_random_seed(0)
    ref = keras.applications.ResNet50(weights=None, classifier_activation=None)
    _randomise_keras(ref)
    # The legacy layout of the official files, written by Keras's own legacy writer
    # (Keras 3's `save_weights` only writes the `.weights.h5` layout).
    top = tmp_path / "resnet50_random_weights_tf_dim_ordering_tf_kernels.h5"
    with h5py.File(top, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, ref)
    model, meta = convert.convert_file(str(top))
    assert meta.model == {"variant": "v1", "width": 64, "num_classes": 1000, "depth": 50}
    assert meta.preprocessing == preprocessing.spec_for("keras", 224, "stretch")
    images = _images(seed=7)
    ours, theirs = _flax_logits(model, meta, images), _keras_logits(ref, images)
    _assert_close(ours, theirs)

    # _notop: the same file without the `predictions` layer -> a headless model whose
    # stage-4 features are Keras's last block output.
    notop = tmp_path / "resnet50_random_notop.h5"
    with h5py.File(top) as src, h5py.File(notop, "w") as dst:
        names = [n for n in src.attrs["layer_names"] if str(n) != "predictions"]
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        dst.attrs["layer_names"] = names
        for name in names:
            src.copy(src[name], dst, name=str(name))
    headless, meta0 = convert.convert_file(str(notop))
    assert meta0.model["num_classes"] == 0 and meta0.taxonomy is None
    trunk = keras.Model(ref.input, ref.get_layer("conv5_block3_out").output)
    from keras.applications.resnet50 import preprocess_input

    want = np.asarray(trunk(preprocess_input(images.astype(np.float32)), training=False))
    got = np.asarray(headless.features(preprocessing.normalize(images, meta0.preprocessing)))
    _assert_close(got, want)
