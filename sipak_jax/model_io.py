"""Reading and writing model DIRs (docs/architecture.md "Model DIRs"), and weight loading.

A model DIR is either

- a converted-weights DIR (``sipak_jax.convert``): ``DIR/metadata.json`` (``"kind":
  "converted"``) and ``DIR/checkpoint/``, an orbax ``StandardCheckpointer`` directory holding
  the pure dict of the model's parameters and BatchNorm statistics; or
- a training workdir: ``DIR/metadata.json`` (``"kind": "training"``) and ``DIR/checkpoints/``,
  an orbax ``CheckpointManager`` directory whose steps hold the items ``model`` (the same pure
  dict), ``opt_state`` and ``meta``. ``load_model_dir`` picks the step with the best
  validation metric (``metadata["best_metric"]``, default ``"val_macro_f1"``, read from the
  metrics saved with each step); without metrics, the latest step.

Restores never trust the shardings stored in a checkpoint: every array is restored with a
concrete sharding (replicated over the local devices unless told otherwise), built from the
checkpoint's own array metadata, then merged into the model strictly: every tensor of the
model comes from exactly one tensor of the checkpoint, shapes must agree, and anything left
over is an error that lists it (``WeightMismatchError``). Dropout RNG state saved with a
model is the one thing a merge leaves out on purpose.

``init_from(model, source)`` is the training initialisation: a model DIR or a raw weights
file (``.h5``, ``.pth``, ``.safetensors``) loads everything but the head, which stays as the
new model built it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sipak_jax.models.resnet import ResNet

FORMAT = "sipak_jax.model/1"
METADATA_FILE = "metadata.json"
CONVERTED_CHECKPOINT = "checkpoint"
TRAINING_CHECKPOINTS = "checkpoints"
MODEL_ITEM = "model"
DEFAULT_BEST_METRIC = "val_macro_f1"
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)  # what a checkpoint holds (no RNG state)


class WeightMismatchError(ValueError):
    """A strict merge found tensors it could not place exactly once; the message lists them."""


# ---------------------------------------------------------------------------------------------
# Model construction and state.


def model_from_config(
    config: Mapping, *, dtype=jnp.float32, dropout_rate: float = 0.0, seed: int = 0
) -> ResNet:
    """Builds the ResNet described by a metadata ``model`` dict (depth, variant, num_classes,
    width, optional stage_sizes), randomly initialised."""
    try:
        depth, variant, num_classes = config["depth"], config["variant"], config["num_classes"]
    except KeyError as e:
        raise ValueError(
            f"metadata 'model' lacks {e.args[0]!r} (has {sorted(config)}); expected depth, "
            "variant, num_classes, width."
        ) from None
    stage_sizes = config.get("stage_sizes")
    return ResNet(
        int(depth),
        int(num_classes),
        variant=variant,
        width=int(config.get("width", 64)),
        stage_sizes=tuple(stage_sizes) if stage_sizes else None,
        dropout_rate=dropout_rate,
        dtype=dtype,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
    )


def abstract_model(config: Mapping, **kwargs) -> ResNet:
    """Like ``model_from_config`` but with abstract arrays (no memory, no init compute)."""
    return nnx.eval_shape(lambda: model_from_config(config, **kwargs))


def weights_state(model: nnx.Module) -> dict:
    """The pure dict of the model's parameters and BatchNorm statistics: what a model DIR's
    checkpoint (and a training step's ``model`` item) holds. RNG state is left out."""
    return nnx.to_pure_dict(nnx.state(model, _WEIGHTS))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten(tree) -> dict[str, object]:
    """{'layer1/0/conv1/kernel': leaf, ...} for a nested dict of arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {_path_str(p): v for p, v in leaves if v is not None}


def _is_rng_path(path: str) -> bool:
    return "rngs" in path.split("/")


def _check_fit(
    target: Mapping[str, object],
    loaded: Mapping[str, object],
    skip,
    what: str,
    model_desc: str,
) -> dict[str, object]:
    """{path: loaded array} for every target path not skipped; raises WeightMismatchError
    listing every missing, unexpected and mis-shaped tensor."""
    missing, misshaped, new_values = [], [], {}
    for path, current in target.items():
        if skip(path):
            continue
        if path not in loaded:
            missing.append(f"{path} {tuple(current.shape)}")
            continue
        value = loaded[path]
        if tuple(np.shape(value)) != tuple(current.shape):
            misshaped.append(
                f"{path}: {what} has {tuple(np.shape(value))}, model expects {tuple(current.shape)}"
            )
            continue
        new_values[path] = value
    unexpected = [
        f"{p} {tuple(np.shape(v))}"
        for p, v in loaded.items()
        if p not in target and not skip(p) and not _is_rng_path(p)
    ]
    if missing or unexpected or misshaped:
        raise WeightMismatchError(
            f"The {what} does not fit the model ({model_desc}):\n"
            + mismatch_listing(
                (f"model tensors not in the {what}", missing),
                (f"{what} tensors with no place in the model", unexpected),
                ("tensors with the wrong shape", misshaped),
            )
        )
    return new_values


def mismatch_listing(*sections: tuple[str, list[str]]) -> str:
    """'N <title>:' followed by the indented items, for each non-empty (title, items): the body
    of every strict-merge error (here and in `sipak_jax.convert`)."""
    return "\n".join(
        f"{len(items)} {title}:\n  " + "\n  ".join(items) for title, items in sections if items
    )


def _skipper(dont_load: Iterable[str]):
    patterns = [re.compile(p) for p in dont_load]
    return lambda path: any(p.fullmatch(path) for p in patterns)


def merge_weights(
    model: nnx.Module,
    loaded: Mapping,
    *,
    dont_load: Iterable[str] = (),
    what: str = "checkpoint",
) -> list[str]:
    """Copies ``loaded`` (nested dict or flat {'a/b/c': array}) into ``model`` strictly.

    Every parameter and BatchNorm statistic of the model must come from exactly one loaded
    array of the same shape, except those whose path fully matches a ``dont_load`` regex
    (they keep their current values). Every loaded array must land somewhere, except those
    matching ``dont_load`` and saved RNG state. Otherwise raises ``WeightMismatchError``
    listing every missing, unexpected and mis-shaped tensor. Returns the paths kept.
    """
    skip = _skipper(dont_load)
    flat_loaded = loaded if _is_flat(loaded) else flatten(loaded)
    state = nnx.state(model, _WEIGHTS)
    target = flatten(nnx.to_pure_dict(state))
    desc = f"{type(model).__name__} {model.config() if hasattr(model, 'config') else ''}"
    new_values = _check_fit(target, flat_loaded, skip, what, desc)

    def pick(path, old):
        new = new_values.get(_path_str(path))
        return old if new is None else jnp.asarray(new, dtype=old.dtype)

    pure = jax.tree_util.tree_map_with_path(pick, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return [p for p in target if skip(p)]


def model_with_weights(
    config: Mapping, loaded: Mapping, *, dtype=jnp.float32, what: str = "checkpoint"
) -> ResNet:
    """Builds the model of a metadata ``model`` dict directly from ``loaded`` weights (flat or
    nested), strictly as ``merge_weights``, without a random initialisation (which would
    compile and run an init program only to throw its result away)."""
    flat_loaded = loaded if _is_flat(loaded) else flatten(loaded)
    abstract = abstract_model(config, dtype=dtype)
    graphdef, state = nnx.split(abstract)
    target = flatten(nnx.to_pure_dict(state))
    desc = f"ResNet {dict(config)}"
    new_values = _check_fit(target, flat_loaded, lambda p: False, what, desc)

    def pick(path, old):
        return jnp.asarray(new_values[_path_str(path)], dtype=old.dtype)

    pure = jax.tree_util.tree_map_with_path(pick, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _is_flat(tree: Mapping) -> bool:
    return all(not isinstance(v, Mapping) for v in tree.values())


# ---------------------------------------------------------------------------------------------
# Orbax restore with concrete shardings.


def default_sharding() -> jax.sharding.Sharding:
    """Replicated over every device (``P()`` on a 1-D mesh named ``data``)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def restore_arrays(checkpoint_dir: str | os.PathLike, sharding=None) -> dict:
    """Restores a ``StandardCheckpointer`` directory as a nested dict of ``jax.Array``s, each
    with ``sharding`` (default: replicated), whatever shardings it was saved with."""
    import orbax.checkpoint as ocp

    checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"No orbax checkpoint directory at {checkpoint_dir}")
    sharding = sharding or default_sharding()
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(checkpoint_dir).item_metadata
        if meta is None:
            raise ValueError(f"{checkpoint_dir} is not a readable orbax checkpoint (no metadata).")
        meta = getattr(meta, "tree", meta)
        target = jax.tree.map(
            lambda m: (
                jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)
                if hasattr(m, "shape")
                else m
            ),
            meta,
            is_leaf=lambda m: hasattr(m, "shape"),
        )
        return ckptr.restore(checkpoint_dir, target)


# ---------------------------------------------------------------------------------------------
# Model DIRs.


def read_metadata(path: str | os.PathLike) -> dict:
    """Reads and checks ``path/metadata.json``; errors name the file and the field."""
    file = os.path.join(os.fspath(path), METADATA_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file} not found: {path} is not a model DIR (make one with `python -m "
            "sipak_jax.convert` or by training with `python main.py --workdir=DIR`)."
        )
    try:
        with open(file) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}.")
    if meta.get("kind") not in ("converted", "training"):
        raise ValueError(
            f"{file}: 'kind' must be 'converted' or 'training', got {meta.get('kind')!r}."
        )
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{file}: 'model' must be a dict with depth, variant, num_classes, width.")
    names = meta.get("class_names")
    if names is not None and len(names) != meta["model"].get("num_classes"):
        raise ValueError(
            f"{file}: {len(names)} class_names for num_classes={meta['model'].get('num_classes')}."
        )
    return meta


def write_metadata(path: str | os.PathLike, metadata: Mapping) -> None:
    """Writes ``path/metadata.json`` (atomically: temp file + rename)."""
    file = os.path.join(os.fspath(path), METADATA_FILE)
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(metadata), f, indent=1)
        f.write("\n")
    os.replace(tmp, file)


def save_model_dir(
    path: str | os.PathLike, model: nnx.Module, metadata: Mapping, *, overwrite: bool = False
) -> None:
    """Writes a converted-weights DIR: ``checkpoint/`` (orbax) and ``metadata.json``.

    Refuses a non-empty ``path`` unless ``overwrite`` (then only ``checkpoint/`` and
    ``metadata.json`` are replaced; other files stay)."""
    import shutil

    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(
            f"{path} is not empty ({', '.join(sorted(os.listdir(path))[:5])}...); choose a new "
            "output directory or pass --overwrite."
        )
    meta = {"format": FORMAT, **dict(metadata)}
    meta.setdefault("kind", "converted")
    if meta.get("model") is not None and dict(meta["model"]) != model.config():
        raise ValueError(
            f"metadata 'model' {meta['model']} does not describe the model {model.config()}."
        )
    meta["model"] = model.config()
    os.makedirs(path, exist_ok=True)
    ckpt = os.path.join(path, CONVERTED_CHECKPOINT)
    if os.path.exists(ckpt):
        shutil.rmtree(ckpt)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(ckpt, weights_state(model))
        ckptr.wait_until_finished()
    write_metadata(path, meta)
    read_metadata(path)  # what we wrote must read back


def _best_step(checkpoints_dir: str, metric: str) -> tuple[int, str]:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(checkpoints_dir, options=options) as mngr:
        steps = list(mngr.all_steps())
        if not steps:
            raise FileNotFoundError(f"No checkpoint steps in {checkpoints_dir}.")
        scored = []
        for step in steps:
            metrics = mngr.metrics(step) or {}
            if metric in metrics:
                scored.append((float(metrics[metric]), step))
        if scored:
            best = max(scored)  # ties: the later step
            return best[1], f"best {metric}={best[0]:.6g}"
        return max(steps), f"latest (no step saved the metric {metric!r})"


def load_model_dir(
    path: str | os.PathLike, *, dtype=jnp.float32, step: int | None = None, sharding=None
) -> tuple[ResNet, dict]:
    """Loads a model DIR (converted or training workdir) -> (model in eval mode, metadata).

    For a training workdir the step is ``step`` or the best one (module docstring);
    ``metadata["step"]`` and ``metadata["step_reason"]`` say which was loaded.
    """
    path = os.fspath(path)
    meta = read_metadata(path)
    if meta["kind"] == "converted":
        ckpt = os.path.join(path, CONVERTED_CHECKPOINT)
    else:
        ckpts = os.path.abspath(os.path.join(path, TRAINING_CHECKPOINTS))
        if not os.path.isdir(ckpts):
            raise FileNotFoundError(f"{path} is a training workdir without {ckpts}.")
        if step is None:
            step, reason = _best_step(ckpts, meta.get("best_metric", DEFAULT_BEST_METRIC))
        else:
            reason = "requested"
        ckpt = os.path.join(ckpts, str(step), MODEL_ITEM)
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"Step {step} has no '{MODEL_ITEM}' item at {ckpt}.")
        meta = {**meta, "step": int(step), "step_reason": reason}
    model = model_with_weights(
        meta["model"], restore_arrays(ckpt, sharding), dtype=dtype, what=f"checkpoint {ckpt}"
    )
    model.eval()
    return model, meta


def load_weights(source: str | os.PathLike, sharding=None) -> tuple[dict, dict]:
    """(flat {'path': array} of the model's state, metadata) from a model DIR or a raw weights
    file (``.h5`` Keras, ``.pth`` / ``.safetensors`` torchvision), for ``init_from``."""
    source = os.fspath(source)
    if os.path.isdir(source):
        meta = read_metadata(source)
        if meta["kind"] == "converted":
            ckpt = os.path.join(source, CONVERTED_CHECKPOINT)
        else:
            ckpts = os.path.abspath(os.path.join(source, TRAINING_CHECKPOINTS))
            step, _ = _best_step(ckpts, meta.get("best_metric", DEFAULT_BEST_METRIC))
            ckpt = os.path.join(ckpts, str(step), MODEL_ITEM)
        return flatten(restore_arrays(ckpt, sharding)), meta
    from sipak_jax import convert  # imported here: h5py/torch only when a raw file is given

    model, meta = convert.convert_file(source)
    return flatten(weights_state(model)), meta


def init_from(
    model: ResNet, source: str | os.PathLike, *, keep: Iterable[str] = ("fc/.*",)
) -> dict:
    """Loads the backbone and BatchNorm statistics of ``source`` (model DIR or weights file)
    into ``model``, keeping its head (paths matching ``keep`` regexes, default the ``fc``
    layer). Strict about everything else (``merge_weights``); the source's architecture
    (depth, variant, width) must equal the model's. Returns a summary for the log."""
    flat, meta = load_weights(source)
    src_cfg = meta["model"]
    mine = model.config()
    for key in ("depth", "variant", "width"):
        if src_cfg.get(key, 64 if key == "width" else None) != mine.get(key):
            raise WeightMismatchError(
                f"{source} holds a ResNet with {key}={src_cfg.get(key)!r}, the model has "
                f"{key}={mine.get(key)!r}; build the model with {key}={src_cfg.get(key)!r}."
            )
    kept = merge_weights(model, flat, dont_load=keep, what=f"weights {source}")
    loaded = len(flatten(weights_state(model))) - len(kept)
    return {"source": os.fspath(source), "loaded": loaded, "kept": kept, "metadata": meta}
