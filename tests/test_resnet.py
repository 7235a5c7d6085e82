"""The Flax ResNet family: structure against torchvision and Keras, and behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sipak_jax.convert import _torch_key, _transform
from sipak_jax.models import DEPTHS, ResNet


def _count(model, *filters):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Any(*filters))))


def _abstract(*args, **kwargs):
    return nnx.eval_shape(lambda: ResNet(*args, rngs=nnx.Rngs(0), **kwargs))


def test_resnet50_parameter_counts_equal_the_references():
    # torchvision.models.resnet50(): sum of p.numel() over parameters (BN statistics are buffers).
    v15 = _abstract(50, 1000, variant="v1.5")
    assert _count(v15, nnx.Param) == 25_557_032
    # keras.applications.ResNet50(): "Total params: 25,636,712" counts the BN moving mean/var
    # too (53,120); its convolutions have biases (26,560 more trainable parameters).
    v1 = _abstract(50, 1000, variant="v1")
    assert _count(v1, nnx.Param) == 25_583_592
    assert _count(v1, nnx.BatchStat) == 53_120
    assert _count(v1, nnx.Param, nnx.BatchStat) == 25_636_712


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_structure_matches_torchvision_tensor_for_tensor(depth):
    """Every parameter and statistic of our v1.5 model has exactly one torchvision tensor of the
    same (transposed) shape, and vice versa (apart from the num_batches_tracked counters)."""
    import torch
    import torchvision

    with torch.device("meta"):
        ref = getattr(torchvision.models, f"resnet{depth}")()
    ref_shapes = {
        k: tuple(v.shape) for k, v in ref.state_dict().items() if "num_batches_tracked" not in k
    }
    ours = _abstract(depth, 1000)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            nnx.to_pure_dict(nnx.state(ours, nnx.Any(nnx.Param, nnx.BatchStat)))
        )[0]
    }
    seen = set()
    for path, leaf in flat.items():
        key, how = _torch_key(path.split("/"))
        assert key in ref_shapes, f"{path} -> {key} is not a torchvision tensor"
        assert key not in seen
        seen.add(key)
        shape = _transform(np.empty(ref_shapes[key], np.int8), how).shape
        assert shape == leaf.shape, (path, key)
    assert seen == set(ref_shapes)
    assert _count(ours, nnx.Param) == sum(p.numel() for p in ref.parameters())


# keras.applications "Total params" (parameters + BN statistics) for 1000 classes.
KERAS_TOTALS = {50: 25_636_712, 101: 44_707_176, 152: 60_419_944}


@pytest.mark.parametrize("depth", sorted(KERAS_TOTALS))
def test_keras_variant_totals(depth):
    model = _abstract(depth, 1000, variant="v1")
    assert _count(model, nnx.Param, nnx.BatchStat) == KERAS_TOTALS[depth]


def test_variants_put_the_stride_where_their_frameworks_do():
    v1 = ResNet(50, 3, variant="v1", width=8, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    v15 = ResNet(50, 3, variant="v1.5", width=8, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    b1, b15 = v1.layer2[0], v15.layer2[0]
    assert b1.conv1.strides == (2, 2) and b1.conv2.strides == (1, 1)
    assert b15.conv1.strides == (1, 1) and b15.conv2.strides == (2, 2)
    assert b1.conv1.bias is not None and b15.conv1.bias is None
    assert b1.bn1.epsilon == pytest.approx(1.001e-5) and b15.bn1.epsilon == pytest.approx(1e-5)
    assert b1.bn1.momentum == pytest.approx(0.99) and b15.bn1.momentum == pytest.approx(0.9)
    # The first stage keeps the resolution (stride 1) but projects 8 -> 32 channels.
    assert v15.layer1[0].downsample_conv.strides == (1, 1)


def _tiny(**kw):
    kw.setdefault("width", 8)
    return ResNet(kw.pop("depth", 18), kw.pop("num_classes", 5), rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("depth", [18, 50])
def test_features_then_classify_equals_the_full_model_at_every_stage(depth):
    model = _tiny(depth=depth, stage_sizes=(1, 1, 1, 1))
    model.eval()
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    logits = model(x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    expansion = 4 if depth == 50 else 1
    for stage in range(5):
        h = model.features(x, stage)
        side = 16 // 2 ** max(stage - 1, 0)
        channels = 8 * (2 ** max(stage - 1, 0)) * (expansion if stage else 1)
        assert h.shape == (2, side, side, channels)
        np.testing.assert_allclose(model.classify(h, stage), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stage"):
        model.features(x, 5)


def test_gradients_reach_every_stage_of_an_untrained_model():
    """Saliency on a fresh model needs live branches: non-zero BN scales everywhere."""
    model = _tiny(stage_sizes=(1, 1, 1, 1))
    model.eval()
    x = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
    gx = jax.grad(lambda x: model(x)[0, 0])(x)  # through the stem's max pooling
    assert float(jnp.abs(gx).sum()) > 0
    for stage in range(5):
        h = model.features(x, stage)
        g = jax.grad(lambda h, s=stage: model.classify(h, s)[0, 0])(h)
        assert float(jnp.abs(g).sum()) > 0
    scales = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        if "scale" in str(path)
    ]
    assert scales and all(float(jnp.min(jnp.abs(s))) > 0 for s in scales)


def test_bfloat16_computation_keeps_float32_parameters_and_logits():
    f32 = _tiny(stage_sizes=(1, 1, 1, 1))
    bf16 = _tiny(stage_sizes=(1, 1, 1, 1), dtype=jnp.bfloat16)
    nnx.update(bf16, nnx.state(f32))
    f32.eval()
    bf16.eval()
    for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Any(nnx.Param, nnx.BatchStat))):
        assert leaf.dtype == jnp.float32
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    out = bf16(x)
    assert out.dtype == jnp.float32
    assert bf16.features(x, 2).dtype == jnp.bfloat16
    ref = f32(x)
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_batchnorm_momentum_matches_torch_running_mean_update():
    import torch

    model = _tiny(stage_sizes=(1, 1, 1, 1))
    model.train()
    x = np.random.RandomState(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    conv_out = model.conv1(jnp.asarray(x))
    model(jnp.asarray(x))
    bn = torch.nn.BatchNorm2d(8)  # momentum 0.1, torchvision's default
    bn.train()
    bn(torch.from_numpy(np.array(conv_out)).permute(0, 3, 1, 2))
    np.testing.assert_allclose(model.bn1.mean[...], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training_mode():
    model = _tiny(stage_sizes=(1, 1, 1, 1), dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    model.eval()
    a, b = model(x), model(x)
    np.testing.assert_array_equal(a, b)
    model.train()
    c = model(x)
    assert not np.allclose(a, c)


def test_headless_model_returns_pooled_features():
    """A headless model (num_classes=0) returns the global average of the last stage's
    activations: computed here by hand from a full model with the same backbone weights, whose
    head applied to those features gives its logits."""
    full = _tiny(num_classes=5, stage_sizes=(1, 1, 1, 1))
    headless = _tiny(num_classes=0, stage_sizes=(1, 1, 1, 1))
    assert headless.fc is None and headless.num_features == 64
    backbone = nnx.state(full, nnx.Any(nnx.Param, nnx.BatchStat))
    backbone = nnx.to_pure_dict(backbone)
    del backbone["fc"]
    state = nnx.state(headless, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, backbone)
    nnx.update(headless, state)
    for m in (full, headless):
        m.eval()
    x = jax.random.normal(jax.random.key(7), (2, 64, 64, 3))  # 2 x 2 maps: a real average
    out = np.asarray(headless(x))
    activations = np.asarray(full.features(x, 4), np.float64)
    assert activations.shape == (2, 2, 2, 64) and out.shape == (2, 64)
    pooled = activations.sum(axis=(1, 2)) / 4.0
    np.testing.assert_allclose(out, pooled, rtol=1e-5, atol=1e-6)
    kernel, bias = np.asarray(full.fc.kernel[...]), np.asarray(full.fc.bias[...])
    np.testing.assert_allclose(np.asarray(full(x)), pooled @ kernel + bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 20}, "depth"),
        ({"variant": "v2"}, "variant"),
        ({"stage_sizes": (1, 1, 1)}, "stage_sizes"),
        ({"num_classes": -1}, "num_classes"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kwargs)


@pytest.mark.parametrize("layer, stride", [("conv3", 1), ("conv1", 2)])
def test_the_models_1x1_convolutions_equal_real_ones(layer, stride):
    """The 1x1 convolutions of a ResNet (computed as matrix products, `models/conv.py`) against
    lax.conv_general_dilated: values and gradients, with a bias (Keras's v1 variant), odd
    sizes included (a stride-2 1x1 convolution keeps ceil(H/2) rows)."""
    model = ResNet(50, 3, variant="v1", width=8, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    conv = getattr(model.layer2[0], layer)
    assert conv.kernel_size == (1, 1) and conv.strides == (stride, stride)
    conv.bias[...] = jnp.arange(conv.out_features, dtype=jnp.float32) / 10
    x = jax.random.normal(jax.random.key(5), (2, 7, 9, conv.in_features))
    kernel, bias = conv.kernel[...], conv.bias[...]

    def ref(x, kernel, bias):
        y = jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(jnp.sin(y + bias))

    ours = lambda conv, x: jnp.sum(jnp.sin(conv(x)))
    assert conv(x).shape == (2, 7 if stride == 1 else 4, 9 if stride == 1 else 5, conv.out_features)
    np.testing.assert_allclose(ours(conv, x), ref(x, kernel, bias), rtol=1e-5)
    gx, gk, gb = jax.grad(ref, argnums=(0, 1, 2))(x, kernel, bias)
    np.testing.assert_allclose(jax.grad(ours, argnums=1)(conv, x), gx, rtol=1e-4, atol=1e-5)
    grads = nnx.grad(ours)(conv, x)
    np.testing.assert_allclose(grads["kernel"][...], gk, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["bias"][...], gb, rtol=1e-4, atol=1e-5)
