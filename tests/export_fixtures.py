"""Tiny model DIRs of every family and synthetic crops for the export tests (not a test
module): `tests/test_export.py` and `tests/test_export_web.py` use them."""

import glob

import numpy as np

from tfds_sipakmed.taxonomy import SIPAKMED

TEMPERATURE = 1.7
TOLERANCE = 1e-4

# (model config, weight source of the preprocessing spec, image size)
CASES = {
    "resnet_v1.5": (
        {"depth": 18, "variant": "v1.5", "num_classes": 5, "width": 8, "stage_sizes": [1, 1, 1, 1]},
        "torchvision",
        64,
    ),
    "resnet_v1_bgr": (
        {"depth": 50, "variant": "v1", "num_classes": 5, "width": 8, "stage_sizes": [1, 1, 1, 1]},
        "keras",
        32,
    ),
    "convnext": (
        {"name": "convnext", "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "num_classes": 5},
        "torchvision",
        32,
    ),
    "vit": (
        {
            "name": "vit",
            "image_size": 32,
            "patch_size": 8,
            "embed_dim": 16,
            "depth": 2,
            "num_heads": 2,
            "mlp_dim": 32,
            "num_classes": 5,
        },  # fmt: skip
        "scratch",
        32,
    ),
}


def perturbed(path, leaf, rng):
    """A new value for one parameter or statistic (by its name), or the leaf unchanged."""
    name, shape = str(getattr(path[-1], "key", path[-1])), np.shape(leaf)
    if name == "var":  # BatchNorm running variance
        return rng.uniform(0.5, 2.0, shape)
    if name == "mean":  # BatchNorm running mean
        return rng.normal(0.0, 0.3, shape)
    if name in ("scale", "layer_scale"):  # norms' scales, ConvNeXt's layer scale (init 1e-6)
        return rng.uniform(0.6, 1.4, shape)
    if name == "bias":
        return rng.normal(0.0, 0.1, shape)
    return leaf


def perturb(model, seed):
    """Non-trivial normalisation statistics and affine parameters."""
    import jax
    from flax import nnx

    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    nnx.update(model, with_values(state, {param_key(p): perturbed(p, x, rng) for p, x in leaves}))
    return model


def param_key(path) -> str:
    """'layer1/0/conv1/kernel' for a tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def with_values(state, values: dict):
    """`state` (an nnx State) with the leaves whose path is in `values` replaced."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    pure = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(values.get(param_key(p), x), jnp.float32), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, pure)
    return state


def fit_head(model, config, images):
    """Sets the head so that the logits of `images` (normalised) spread around zero: an
    untrained network gives every cell nearly the same probabilities, which would make the
    comparison weak. The pooled features come from the headless model of the same config
    carrying the same weights."""
    from flax import nnx

    from sipak_jax import model_io

    weights = nnx.Any(nnx.Param, nnx.BatchStat)
    state = nnx.state(model, weights)
    flat = model_io.flatten(nnx.to_pure_dict(state))
    headless = model_io.model_from_config({**config, "num_classes": 0})
    body = nnx.state(headless, weights)
    head = sorted(set(flat) - set(model_io.flatten(nnx.to_pure_dict(body))))
    assert [k.rsplit("/", 1)[1] for k in head] == ["bias", "kernel"], head
    nnx.update(headless, with_values(body, flat))
    headless.eval()
    features = np.asarray(headless(images), np.float64)
    kernel = np.random.default_rng(4).normal(size=(features.shape[1], 5))
    kernel *= 3.0 / ((features - features.mean(0)) @ kernel).std()
    bias = -features.mean(0) @ kernel
    nnx.update(model, with_values(state, {head[0]: bias, head[1]: kernel}))


def model_dir(path, case, files) -> str:
    """A converted model DIR at `path` of the tiny model `CASES[case]`: perturbed weights, a
    head fitted on the crops `files`, temperature `TEMPERATURE`."""
    from sipak_jax import model_io, preprocessing

    config, source, size = CASES[case]
    spec = preprocessing.spec_for(source, image_size=size)
    model = perturb(model_io.model_from_config(config, seed=1), seed=2)
    model.eval()
    fit_head(model, config, preprocessing.normalize(images(files, spec), spec))
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=SIPAKMED,
        preprocessing=spec,
        source={"framework": "test", "file": f"{case}.random"},
        temperature=TEMPERATURE,
    )
    model_io.save_model_dir(path, model, meta)
    return str(path)


def images(files, spec):
    """The network inputs `predict` makes of these files (read, resize by the spec)."""
    from sipak_jax.imageio import read_for_model

    decoded = [read_for_model(f, spec) for f in files]
    assert all(d[2] is None for d in decoded), [d[2] for d in decoded]
    return np.stack([d[0] for d in decoded])


def synthetic_crops(root) -> list[str]:
    """Synthetic SIPaKMeD crops (BMP files, as the real archives hold them) under `root`."""
    from tfds_sipakmed import synthetic

    synthetic.write_synthetic(str(root), cells_per_class=2, seed=3)
    files = sorted(glob.glob(str(root / "im_*" / "CROPPED" / "*.bmp")))
    assert len(files) >= 10
    return files
