"""ConvNeXt through the registry: config round trip, stages for saliency, stochastic depth,
layer ids, layer-wise learning-rate decay in the optimizer, and a training run through
main.py (tiny widths, 32 px). Equivalence with torchvision and timm:
tests/test_convert_convnext.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sipak_jax import model_io, saliency
from sipak_jax.models import registry
from sipak_jax.models.convnext import ConvNeXt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"name": "convnext", "depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32], "num_classes": 5}


def _create(config, **kwargs):
    """`registry.create` under one jit (eager initialisation compiles every op apart: slow)."""
    return nnx.jit(lambda: registry.create(config, **kwargs))()


@nnx.jit(static_argnums=2)
def _through_stage(model, x, stage):
    """(features at `stage`, classify of them, the whole model) in one compiled call."""
    h = model.features(x, stage)
    return h, model.classify(h, stage), model(x)


def _x(n=2, size=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def test_registry_builds_rebuilds_and_describes():
    model = _create(TINY, seed=3)
    assert isinstance(model, ConvNeXt) and model.config() == TINY
    assert registry.config_of(model) == TINY
    registry.check_config(TINY)
    with pytest.raises(ValueError, match="model.dims"):
        registry.check_config(dict(TINY, dims=[8, 16]))
    with pytest.raises(ValueError, match="model.name"):
        registry.check_config(dict(TINY, name="convnet"))
    real = dict(TINY, depths=[3, 3, 9, 3], dims=[96, 192, 384, 768])
    assert registry.describe(real) == "ConvNeXt-T"
    # The same seed gives the same weights; the metadata validates the config.
    a = model_io.flatten(model_io.weights_state(model))
    b = model_io.flatten(model_io.weights_state(_create(TINY, seed=3)))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(a["stage1/0/layer_scale"], np.full(8, 1e-6, np.float32))


def test_stages_compose_and_the_overlay_stage_is_sensible():
    model = _create(TINY)
    model.eval()
    x = _x()
    for stage in (0, 2, 4):
        _, from_stage, logits = _through_stage(model, x, stage)
        assert logits.shape == (2, 5) and logits.dtype == jnp.float32
        np.testing.assert_allclose(from_stage, logits, atol=1e-6)
    sizes = saliency.stage_map_sizes(model, 224)
    assert sizes == {1: (56, 56), 2: (28, 28), 3: (14, 14), 4: (7, 7)}
    assert saliency.overlay_stage(model, 224) == 4  # 7x7, as ResNet's layer4
    assert saliency.overlay_stage(model, 64) == 2  # 8x8


def test_bfloat16_compute_keeps_float32_parameters():
    model = _create(TINY, dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    model.eval()
    h, _, logits = _through_stage(model, _x(), 2)
    assert h.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_drop_path_drops_whole_samples_in_training_only():
    model = _create(dict(TINY, depths=[1, 1, 1, 1]), drop_path=0.6, seed=1)
    rates = [b.drop_path.rate for s in range(1, 5) for b in getattr(model, f"stage{s}")[:1]
             if b.drop_path is not None]  # fmt: skip
    assert rates == pytest.approx([0.2, 0.4, 0.6])  # linear from 0 (first block: none)
    # Layer scale 1 so that a dropped branch changes the output visibly.
    for s in range(1, 5):
        for block in getattr(model, f"stage{s}"):
            block.layer_scale[...] = jnp.ones_like(block.layer_scale[...])
    x = jnp.repeat(_x(1), 16, axis=0)  # 16 copies of one image
    model.train()
    out = np.asarray(_through_stage(model, x, 4)[0])
    distinct = {tuple(np.round(o.ravel()[:8], 5)) for o in out}
    assert len(distinct) > 1  # samples draw their own masks
    model.eval()
    out = np.asarray(_through_stage(model, x, 4)[0])
    np.testing.assert_array_equal(out, np.broadcast_to(out[:1], out.shape))
    plain = _create(dict(TINY, depths=[1, 1, 1, 1]), seed=1)
    nnx.update(plain, nnx.state(model, nnx.Param))
    plain.eval()
    np.testing.assert_allclose(np.asarray(_through_stage(plain, x, 4)[0]), out, atol=1e-6)


def test_layer_ids_follow_the_convnext_fine_tuning_groups():
    base = registry.abstract(
        {
            "name": "convnext",
            "depths": [3, 3, 27, 3],
            "dims": [128, 256, 512, 1024],
            "num_classes": 10,
        }  # fmt: skip
    )
    # The authors' 14 groups (ConvNeXt/BEiT optim_factory): stage 3's blocks three at a time.
    assert base.num_layer_ids == 14
    cases = {
        "stem_conv/kernel": 0, "stage1/2/fc1/kernel": 1, "down2/conv/kernel": 2,
        "stage2/0/norm/scale": 2, "down3/norm/bias": 3, "stage3/0/dwconv/kernel": 3,
        "stage3/5/layer_scale": 4, "stage3/26/fc2/bias": 11, "down4/conv/bias": 12,
        "stage4/2/fc1/kernel": 12, "norm/scale": 13, "fc/kernel": 13,
    }  # fmt: skip
    assert {p: base.layer_id(p) for p in cases} == cases
    tiny = registry.abstract(dict(TINY, depths=[3, 3, 9, 3]))
    assert tiny.num_layer_ids == 8 and tiny.layer_id("stage4/0/fc1/bias") == 6
    every = model_io.flatten(model_io.weights_state(tiny))
    assert {tiny.layer_id(p) for p in every} == set(range(8))


def _optimizer_config(layer_decay):
    from configs import convnext_tiny

    config = convnext_tiny.get_config()
    config.model.depths, config.model.dims = (1, 1, 2, 1), (8, 16, 24, 32)
    config.num_epochs, config.head_epochs, config.warmup_epochs = 2, 0, 0
    config.grad_clip_norm = 0.0
    config.optimizer.layer_decay = layer_decay
    return config


@pytest.mark.parametrize("family", ["convnext", "resnet"])
def test_layer_decay_scales_each_update_by_its_layer(family):
    """Update with decay d == update without decay * d ** (num_layer_ids - 1 - layer_id): the
    learning rate of each group scaled, as in the ConvNeXt / BEiT recipes (AdamW's weight
    decay term is scaled with it, as torch's per-group learning rate does)."""
    from sipak_jax import train_step

    config = _optimizer_config(0.5)
    if family == "resnet":
        from configs import demo

        config = demo.get_config()
        config.model.width, config.head_epochs, config.warmup_epochs = 4, 0, 0
    model = nnx.jit(lambda: train_step.create_model(config, 5, seed=0))()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def wavy(p):  # a gradient with every sign and size, different in every entry
        return jnp.sin(jnp.arange(p.size, dtype=jnp.float32) + 0.5).reshape(p.shape)

    grads = jax.jit(lambda ps: jax.tree.map(wavy, ps))(params)

    def first_update(decay):
        config.optimizer.layer_decay = decay
        tx, _ = train_step.make_optimizer(config, 10, model)
        updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
        return model_io.flatten(updates)

    plain, decayed = first_update(1.0), first_update(0.5)
    top = model.num_layer_ids - 1
    seen = set()
    for path, u in plain.items():
        factor = 0.5 ** (top - model.layer_id(path))
        seen.add(factor)
        np.testing.assert_allclose(np.asarray(decayed[path]), np.asarray(u) * factor, rtol=1e-6)
    assert max(seen) == 1.0 and min(seen) == 0.5**top  # the head unscaled, the stem the least
    assert float(np.abs(np.asarray(plain["fc/kernel"])).max()) > 0


def test_layer_decay_needs_the_model():
    from sipak_jax import train_step

    with pytest.raises(ValueError, match="layer_decay"):
        train_step.make_optimizer(_optimizer_config(0.8), 10)


@pytest.mark.slow
def test_main_trains_a_tiny_convnext_end_to_end(tmp_path):
    """`python main.py --config=configs/convnext_tiny.py` with the demo's kind of overrides
    (synthetic cells read TF-free, from scratch, 32 px, tiny widths, one epoch): a workdir
    that is a ConvNeXt model DIR, test results, Grad-CAM artifacts."""
    workdir = tmp_path / "run"
    overrides = {
        "synthetic.cells_per_class": 16, "use_tfds": False, "image_size": 32,
        "augment": "('rot90', 'flip')", "init_from": "", "compute_dtype": "float32",
        "model.depths": "(1, 1, 1, 1)", "model.dims": "(8, 16, 16, 16)", "batch_size": 16,
        "eval_batch_size": 64, "num_epochs": 1, "head_epochs": 0, "warmup_epochs": 0,
        "learning_rate": 1e-3, "profile_steps": 0, "num_overlay_cells": 2, "writer": "jsonl",
        "evaluators": "('calibration', 'test', 'artifacts')", "log_every_steps": 5,
    }  # fmt: skip
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "main.py", "--config=configs/convnext_tiny.py", f"--workdir={workdir}",
         *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model: ConvNeXt depths (1, 1, 1, 1) dims (8, 16, 16, 16)" in proc.stdout
    assert any(line.startswith("epoch 1/1  train loss ") for line in proc.stdout.splitlines())
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["name"] == "convnext" and config["optimizer"]["layer_decay"] == 0.8
    assert config["model"]["drop_path"] == 0.1
    results = json.loads((workdir / "results.json").read_text())
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    index = json.loads((workdir / "artifacts" / "index.json").read_text())
    assert index["images"] and all(i["map_size"] == [8, 8] for i in index["images"])
    model, meta = model_io.load_model_dir(workdir)
    assert isinstance(model, ConvNeXt) and meta.model["name"] == "convnext"
    assert model(jnp.zeros((1, 32, 32, 3))).shape == (1, 5)


@pytest.mark.parametrize(
    "shape, kernel, pads",
    [
        ((2, 9, 7, 6), 7, ((3, 3), (3, 3))),
        ((1, 5, 6, 4), 3, ((1, 1), (0, 2))),
        ((2, 2, 2, 3), 7, ((3, 3), (3, 3))),
    ],
)
def test_depthwise_formulation_equals_lax_values_and_gradients(shape, kernel, pads):
    """ConvNeXt's depthwise convolutions go through `conv.depthwise_conv` (shifted windows,
    written-out backward pass); value and both gradients equal XLA's grouped convolution."""
    from jax import lax

    from sipak_jax.models import conv

    c = shape[-1]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 1, c)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")

    def ours(x, k):
        return conv.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=dn,
                                         feature_group_count=c)  # fmt: skip

    def ref(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=dn,
                                        feature_group_count=c)  # fmt: skip

    y = jax.jit(ours)(x, k)
    np.testing.assert_allclose(y, ref(x, k), rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    got = jax.jit(jax.vjp(ours, x, k)[1])(g)
    want = jax.vjp(ref, x, k)[1](g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    jaxpr = str(jax.make_jaxpr(ours)(x, k))
    assert "conv_general_dilated" not in jaxpr  # the depthwise form, not XLA's convolution
