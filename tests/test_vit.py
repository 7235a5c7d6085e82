"""The ViT and the attention head as models: the registry interface (features/classify at every
stage, config round trip, layer ids), stochastic depth, the attention head (weights summing to
1, starting as global average pooling), ResNet's default head unchanged, and `init_from`
resampling a ViT's position embeddings to another image size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sipak_jax import model_io, pretrained
from sipak_jax.models import posembed, registry
from sipak_jax.models.resnet import ResNet
from tfds_sipakmed.taxonomy import Taxonomy

TINY = {"name": "vit", "image_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 4,
        "num_heads": 2, "mlp_dim": 32, "num_classes": 3, "head": "token"}  # fmt: skip


def _create(cfg, **kw):
    """Built under jit (eager initialisation is slow on a loaded CPU)."""
    return nnx.jit(lambda: registry.create(cfg, **kw))()


def _x(n=2, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


@pytest.mark.parametrize("head", ["token", "attention"])
def test_features_then_classify_is_the_model_at_every_stage(head):
    model = _create(dict(TINY, head=head))
    model.eval()
    x = _x()
    logits = model(x)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    for stage in range(model.num_stages + 1):
        h, cls = model.features_with_context(x, stage)
        assert h.shape == (2, 4, 4, 16) and cls.shape == (2, 1, 16)
        np.testing.assert_allclose(model.classify(h, stage, cls), logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="class token"):
        model.classify(h, 4)
    assert registry.config_of(model) == dict(TINY, head=head)
    assert [model.stage_name(s) for s in range(5)] == [
        "embeddings", "blocks 1-1", "blocks 1-2", "blocks 1-3", "input of block 4"
    ]  # fmt: skip
    assert registry.describe(TINY) == "ViT (patch 8, dim 16, depth 4, heads 2) at 32 px"


def test_layer_ids_cover_every_parameter():
    model = _create(dict(TINY, head="attention"))
    paths = model_io.flatten(model_io.weights_state(model))
    ids = {p: model.layer_id(p) for p in paths}
    assert model.num_layer_ids == 6
    assert ids["pos_embed"] == ids["cls_token"] == ids["patch_embed/proj/kernel"] == 0
    assert ids["blocks/2/attn/qkv/kernel"] == 3
    assert ids["fc/kernel"] == ids["attention_pool/proj/kernel"] == ids["norm/scale"] == 5
    assert set(ids.values()) == set(range(6))


def test_no_weight_decay_on_position_embeddings_class_token_and_norms():
    from sipak_jax import train_step

    model = _create(TINY)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = model_io.flatten(jax.tree_util.tree_map_with_path(train_step._decays, params))
    assert not mask["pos_embed"] and not mask["cls_token"]
    assert not mask["norm/scale"] and not mask["blocks/0/attn/qkv/bias"]
    assert mask["blocks/0/attn/qkv/kernel"] and mask["patch_embed/proj/kernel"]


def test_wrong_sizes_and_fields_are_named():
    with pytest.raises(ValueError, match="model.image_size"):
        registry.check_config(dict(TINY, image_size=30))
    with pytest.raises(ValueError, match="model.head"):
        registry.check_config(dict(TINY, head="gap"))
    model = _create(TINY)
    with pytest.raises(ValueError, match="32, 32, 3"):
        model(_x(size=48))


def test_drop_path_acts_per_sample_in_training_only():
    model = _create(TINY, drop_path=0.5, seed=1)
    x = jnp.broadcast_to(_x(1), (8, 32, 32, 3))
    model.eval()
    a, b = model(x), model(x)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, jnp.broadcast_to(a[:1], a.shape), rtol=1e-5, atol=1e-6)
    model.train()
    t = model(x)
    assert not np.allclose(t, jnp.broadcast_to(t[:1], t.shape), atol=1e-4)  # samples differ


def test_attention_head_starts_as_average_pooling_on_resnet():
    kw = dict(variant="v1.5", width=8, stage_sizes=(1, 1, 1, 1))
    gap = nnx.jit(lambda: ResNet(18, 3, rngs=nnx.Rngs(0), **kw))()
    att = nnx.jit(lambda: ResNet(18, 3, head="attention", rngs=nnx.Rngs(0), **kw))()
    gap.eval(), att.eval()
    # The same backbone and fc in both (the pool's own parameters aside).
    state = model_io.flatten(model_io.weights_state(gap))
    model_io.merge_weights(att, state, dont_load=("attention_pool/.*",))
    x = _x(2, 64)
    w = att.attention_map(x)
    assert w.shape == (2, 2, 2)
    np.testing.assert_allclose(w, 0.25, rtol=1e-6)  # zero-initialised score: uniform
    np.testing.assert_allclose(att(x), gap(x), rtol=1e-5, atol=1e-6)
    # The default head is the old ResNet: same parameters, same config.
    assert "head" not in gap.config() and gap.config()["depth"] == 18
    assert not any(p.startswith("attention_pool") for p in state)
    assert att.config()["head"] == "attention"
    assert att.layer_id("attention_pool/score/kernel") == att.num_layer_ids - 1
    with pytest.raises(ValueError, match="no attention head"):
        gap.attention_map(x)


def test_attention_weights_sum_to_one_after_training_moves_them():
    model = _create(dict(TINY, head="attention"))
    pool = model.attention_pool
    pool.score.kernel[...] = jax.random.normal(jax.random.key(3), pool.score.kernel.shape)
    w = model.attention_map(_x())
    assert w.shape == (2, 4, 4)
    np.testing.assert_allclose(w.sum((1, 2)), 1.0, rtol=1e-5)
    assert float(jnp.std(w)) > 1e-3


def test_init_from_resamples_position_embeddings_to_the_training_size(tmp_path):
    source = _create(dict(TINY, image_size=64, num_classes=5))
    meta = model_io.ModelMetadata(
        kind="converted",
        model=source.config(),
        taxonomy=Taxonomy.bare([f"c{i}" for i in range(5)]),
        preprocessing={
            "channel_order": "RGB",
            "mean": [127.5] * 3,
            "std": [127.5] * 3,
            "image_size": 64,
            "resize": "stretch",
        },  # fmt: skip
        source={"framework": "timm", "file": "x.safetensors"},
    )
    model_io.save_model_dir(tmp_path / "src", source, meta)
    target = _create(dict(TINY, head="attention"), seed=5)  # 32 px, 3 classes, new head
    info = pretrained.init_from(target, tmp_path / "src")
    assert sorted(info["kept"]) == sorted(
        p for p in model_io.flatten(model_io.weights_state(target))
        if p.startswith(("fc/", "attention_pool/"))
    )  # fmt: skip
    want = posembed.resample_pos_embed(np.asarray(source.pos_embed[...]), (4, 4), "timm")
    np.testing.assert_allclose(np.asarray(target.pos_embed[...]), want, rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(target.blocks[1].attn.qkv.kernel[...]),
        np.asarray(source.blocks[1].attn.qkv.kernel[...]),
    )
