"""Model DIRs: the one model-metadata type, reading and writing DIRs, strict weight merging.

A model DIR (docs/architecture.md "Model DIRs") is either

- a converted-weights DIR (``sipak_jax.convert``): ``DIR/metadata.json`` (``kind
  "converted"``) and ``DIR/checkpoint/``, an orbax ``StandardCheckpointer`` directory holding
  the pure dict of the model's parameters and BatchNorm statistics; or
- a training workdir: ``DIR/metadata.json`` (``kind "training"``) and ``DIR/checkpoints/``
  (``sipak_jax.checkpointing``), whose steps hold the items ``model`` (the same pure dict),
  ``opt_state`` and ``meta``. ``load_model_dir`` loads the step that
  ``checkpointing.pick_best_step`` picks from the metrics saved with each step (the metric
  named by the metadata's ``best_metric``, default ``checkpointing.BEST_METRIC``).

``metadata.json`` is one type, ``ModelMetadata`` (format ``FORMAT``), written by conversion
and by training through ``write_metadata`` (validated before anything is written) and read
by every loader through ``read_metadata`` (validated again; format ``sipak_jax.model/1`` is
read too). A bad file is a ``MetadataError`` naming the file and the field.

Restores never trust the shardings stored in a checkpoint: every array is restored with a
concrete sharding (replicated over the local devices unless told otherwise), built from the
checkpoint's own array metadata, then merged into the model strictly: every tensor of the
model comes from exactly one tensor of the checkpoint, shapes must agree, and anything left
over is an error that lists it (``WeightMismatchError``). Dropout RNG state saved with a
model is the one thing a merge leaves out on purpose.

Raw weights files (``.h5``, ``.pth``) are ``sipak_jax.convert``'s; the training
initialisation from a DIR or a file is ``sipak_jax.pretrained``'s. This module imports
neither.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sipak_jax import checkpointing, distributed, fileio, preprocessing
from sipak_jax.models import registry
from tfds_sipakmed.taxonomy import Taxonomy, for_class_names

FORMAT = "sipak_jax.model/2"
FORMAT_V1 = "sipak_jax.model/1"  # read, never written: class_names instead of a taxonomy
METADATA_FILE = "metadata.json"
CONVERTED_CHECKPOINT = "checkpoint"
KINDS = ("converted", "training")
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)  # what a checkpoint holds (no RNG state)


class WeightMismatchError(ValueError):
    """A strict merge found tensors it could not place exactly once; the message lists them."""


# ---------------------------------------------------------------------------------------------
# Model construction and state.


def model_from_config(
    config: Mapping, *, dtype=jnp.float32, dropout_rate: float = 0.0, seed: int = 0
) -> nnx.Module:
    """Builds the model a metadata ``model`` dict describes (any family of
    ``sipak_jax.models.registry``; no ``name`` = ResNet), randomly initialised."""
    return registry.create(config, dtype=dtype, dropout_rate=dropout_rate, seed=seed)


def abstract_model(config: Mapping, **kwargs) -> nnx.Module:
    """Like ``model_from_config`` but with abstract arrays (no memory, no init compute)."""
    return registry.abstract(config, **kwargs)


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
    desc = type(model).__name__
    if hasattr(model, "config"):
        desc = f"{desc} {registry.config_of(model)}"
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
) -> nnx.Module:
    """Builds the model of a metadata ``model`` dict directly from ``loaded`` weights (flat or
    nested), strictly as ``merge_weights``, without a random initialisation (which would
    compile and run an init program only to throw its result away)."""
    flat_loaded = loaded if _is_flat(loaded) else flatten(loaded)
    abstract = abstract_model(config, dtype=dtype)
    graphdef, state = nnx.split(abstract)
    target = flatten(nnx.to_pure_dict(state))
    desc = f"{registry.describe(config)} {dict(config)}"
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
    """Replicated over every device (``P()`` on ``distributed.make_mesh()``)."""
    return jax.sharding.NamedSharding(distributed.make_mesh(), jax.sharding.PartitionSpec())


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
# The metadata type.


class MetadataError(ValueError):
    """metadata.json (or a ModelMetadata) is unusable; the message names the file and field."""


def _fail(field: str, message: str):
    raise MetadataError(f"field {field!r}: {message}")


def _check_model(model) -> None:
    if not isinstance(model, Mapping):
        _fail("model", f"expected a dict (a model config), got {type(model).__name__}")
    try:
        registry.check_config(model)
    except ValueError as e:
        raise MetadataError(str(e)) from None
    num_classes = model.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        _fail("model.num_classes", f"must be an integer >= 0, got {num_classes!r}")


def _check_taxonomy(taxonomy, num_classes: int) -> None:
    if num_classes == 0:
        if taxonomy is not None:
            _fail("taxonomy", "must be null for a headless model (model.num_classes 0)")
        return
    if not isinstance(taxonomy, Taxonomy):
        _fail("taxonomy", f"expected a Taxonomy for {num_classes} classes, got {taxonomy!r}")
    if taxonomy.num_classes != num_classes:
        _fail(
            "taxonomy.class_names",
            f"{taxonomy.num_classes} classes for model.num_classes={num_classes}",
        )


def _check_preprocessing(spec) -> None:
    try:
        preprocessing.validate_spec(spec)
    except ValueError as e:
        _fail("preprocessing", str(e))
    size = spec.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        _fail("preprocessing.image_size", f"must be a positive integer, got {size!r}")
    if "resize" not in spec:
        _fail("preprocessing.resize", f"missing (one of {preprocessing.RESIZE_POLICIES})")


def _check_optional(meta: ModelMetadata) -> None:
    for name in ("source", "dataset"):
        value = getattr(meta, name)
        if value is not None and not isinstance(value, Mapping):
            _fail(name, f"must be null or a dict, got {type(value).__name__}")
    t = meta.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        _fail("temperature", f"must be a finite number > 0, got {t!r}")
    if meta.best_metric is not None and (
        not isinstance(meta.best_metric, str) or not meta.best_metric
    ):
        _fail("best_metric", f"must be null or a metric name, got {meta.best_metric!r}")
    fold = meta.fold
    if fold is not None and (not isinstance(fold, int) or isinstance(fold, bool) or fold < 0):
        _fail("fold", f"must be null or an integer >= 0, got {fold!r}")


@dataclasses.dataclass
class ModelMetadata:
    """What a model DIR says about its model (``metadata.json``, format ``FORMAT``).

    Fields:
      kind: "converted" (``sipak_jax.convert``) or "training" (a training workdir).
      model: the architecture as ``model.config()`` gives it (``sipak_jax.models.registry``;
        a ResNet's: depth, variant, num_classes, width, and stage_sizes when not the depth's).
      taxonomy: the classes in logit order and what they mean (``tfds_sipakmed.taxonomy``);
        None only for a headless model (``num_classes`` 0).
      preprocessing: the input the weights expect (``sipak_jax.preprocessing`` spec with
        ``image_size`` and ``resize``).
      source: where the weights came from (file, hash, URL; for training, the ``init_from``
        weights), or None.
      temperature: the softmax temperature fitted on validation (1.0: none).
      best_metric: the metric that picks a training workdir's best step (None:
        ``checkpointing.BEST_METRIC``).
      fold, dataset: the test fold and the data of a training run.
      step, step_reason: set by ``load_model_dir`` on a training workdir (the step loaded and
        why); never written to the file.
    """

    kind: str
    model: dict
    taxonomy: Taxonomy | None
    preprocessing: dict
    source: dict | None = None
    temperature: float = 1.0
    best_metric: str | None = None
    fold: int | None = None
    dataset: dict | None = None
    step: int | None = dataclasses.field(default=None, compare=False)
    step_reason: str | None = dataclasses.field(default=None, compare=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names in logit order (empty for a headless model)."""
        return () if self.taxonomy is None else self.taxonomy.class_names

    def validate(self) -> ModelMetadata:
        """Raises MetadataError naming the first unusable field; returns self."""
        if self.kind not in KINDS:
            _fail("kind", f"must be one of {KINDS}, got {self.kind!r}")
        _check_model(self.model)
        _check_taxonomy(self.taxonomy, self.model["num_classes"])
        _check_preprocessing(self.preprocessing)
        _check_optional(self)
        return self

    def to_dict(self) -> dict:
        """The JSON form of the file (format ``FORMAT``); ``step``/``step_reason`` left out."""
        out = {"format": FORMAT}
        for field in _FILE_FIELDS:
            out[field] = getattr(self, field)
        out["taxonomy"] = None if self.taxonomy is None else self.taxonomy.to_dict()
        out["temperature"] = float(self.temperature)
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelMetadata:
        """Reads ``to_dict``'s form, or format ``sipak_jax.model/1`` (its ``class_names`` become
        a taxonomy: SIPaKMeD's when they are its classes, else a bare one; see
        ``tfds_sipakmed.taxonomy.for_class_names``); validated. Raises MetadataError naming
        the field."""
        if not isinstance(d, Mapping):
            raise MetadataError(f"expected a JSON object, got {type(d).__name__}")
        fields = dict(d)
        fmt = fields.pop("format", None)
        if fmt == FORMAT_V1:
            fields = _fields_from_v1(fields)
        elif fmt != FORMAT:
            _fail("format", f"is {fmt!r}; expected {FORMAT!r} (or {FORMAT_V1!r})")
        unknown = sorted(set(fields) - set(_FILE_FIELDS))
        missing = [f for f in _REQUIRED if f not in fields]
        if unknown or missing:
            raise MetadataError(f"unknown fields {unknown}, missing fields {missing}")
        taxonomy = fields.pop("taxonomy")
        if taxonomy is not None:
            try:
                taxonomy = Taxonomy.from_dict(taxonomy)
            except ValueError as e:
                _fail("taxonomy", str(e))
        return cls(taxonomy=taxonomy, **fields).validate()


_FILE_FIELDS = tuple(
    f.name for f in dataclasses.fields(ModelMetadata) if f.name not in ("step", "step_reason")
)
_REQUIRED = ("kind", "model", "taxonomy", "preprocessing")


def _fields_from_v1(fields: dict) -> dict:
    names = fields.pop("class_names", None)
    model = fields.get("model")
    headless = isinstance(model, Mapping) and model.get("num_classes") == 0
    if names is None and not headless:
        _fail("class_names", "missing (format sipak_jax.model/1 names the classes there)")
    fields["taxonomy"] = None if names is None else for_class_names(names).to_dict()
    return fields


# ---------------------------------------------------------------------------------------------
# Model DIRs.


def _metadata_file(path) -> str:
    return os.path.join(os.fspath(path), METADATA_FILE)


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    """Reads and validates ``path/metadata.json``; errors name the file and the field."""
    file = _metadata_file(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file} not found: {path} is not a model DIR (make one with `python -m "
            "sipak_jax.convert` or by training with `python main.py --workdir=DIR`)."
        )
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetadataError(f"{file} is not valid JSON: {e}") from None
    try:
        return ModelMetadata.from_dict(raw)
    except MetadataError as e:
        raise MetadataError(f"{file}: {e}") from None


def write_metadata(path: str | os.PathLike, metadata: ModelMetadata) -> None:
    """Validates ``metadata`` and writes ``path/metadata.json`` atomically."""
    file = _metadata_file(path)
    if not isinstance(metadata, ModelMetadata):
        raise TypeError(f"write_metadata({file}) takes a ModelMetadata, got {type(metadata)}")
    try:
        metadata.validate()
    except MetadataError as e:
        raise MetadataError(f"refusing to write {file}: {e}") from None
    fileio.atomic_write_json(file, metadata.to_dict())


def save_model_dir(
    path: str | os.PathLike, model: nnx.Module, metadata: ModelMetadata, *, overwrite=False
) -> None:
    """Writes a converted-weights DIR: ``checkpoint/`` (orbax) and ``metadata.json``.

    ``metadata.kind`` must be "converted" and ``metadata.model`` the model's config. Refuses a
    non-empty ``path`` unless ``overwrite`` (then only ``checkpoint/`` and ``metadata.json``
    are replaced; other files stay)."""
    import shutil

    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if metadata.kind != "converted" or dict(metadata.model) != registry.config_of(model):
        raise ValueError(
            f"save_model_dir({path}) writes converted DIRs of the model it is given: metadata "
            f"kind {metadata.kind!r} (expected 'converted'), model {metadata.model} (the model "
            f"is {registry.config_of(model)})."
        )
    metadata.validate()
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(
            f"{path} is not empty ({', '.join(sorted(os.listdir(path))[:5])}...); choose a new "
            "output directory or pass --overwrite."
        )
    os.makedirs(path, exist_ok=True)
    ckpt = os.path.join(path, CONVERTED_CHECKPOINT)
    if os.path.exists(ckpt):
        shutil.rmtree(ckpt)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(ckpt, weights_state(model))
        ckptr.wait_until_finished()
    write_metadata(path, metadata)
    read_metadata(path)  # what we wrote must read back


def weights_dir(
    path: str | os.PathLike, metadata: ModelMetadata, step: int | None = None
) -> tuple[str, int | None, str]:
    """(the orbax directory holding the weights, step, why) of a model DIR: a converted DIR's
    ``checkpoint/``; a training workdir's ``step`` or the step ``pick_best_step`` picks."""
    path = os.path.abspath(os.fspath(path))
    if metadata.kind == "converted":
        return os.path.join(path, CONVERTED_CHECKPOINT), None, "converted weights"
    ckpts = checkpointing.checkpoint_dir(path)
    if not os.path.isdir(ckpts):
        raise FileNotFoundError(f"{path} is a training workdir without {ckpts}.")
    reason = "requested"
    if step is None:
        metric = metadata.best_metric or checkpointing.BEST_METRIC
        ckpt = checkpointing.Checkpointer(path, read_only=True)
        try:
            by_step = ckpt.metrics_by_step()
        finally:
            ckpt.close()
        step = checkpointing.pick_best_step(by_step, metric)
        if step is None:
            raise FileNotFoundError(f"No checkpoint steps in {ckpts}.")
        value = checkpointing.metric_value(by_step[step], metric)
        reason = (
            f"latest (no step saved the metric {metric!r})"
            if value is None
            else f"best {metric}={value:.6g}"
        )
    item = os.path.join(ckpts, str(step), checkpointing.MODEL_ITEM)
    if not os.path.isdir(item):
        raise FileNotFoundError(f"Step {step} has no '{checkpointing.MODEL_ITEM}' item at {item}.")
    return item, int(step), reason


def load_model_dir(
    path: str | os.PathLike, *, dtype=jnp.float32, step: int | None = None, sharding=None
) -> tuple[nnx.Module, ModelMetadata]:
    """Loads a model DIR (converted or training workdir) -> (model in eval mode, metadata).

    For a training workdir the step is ``step`` or the best one (module docstring); the
    metadata's ``step`` and ``step_reason`` say which was loaded.
    """
    meta = read_metadata(path)
    ckpt, loaded_step, reason = weights_dir(path, meta, step)
    if meta.kind == "training":
        meta = dataclasses.replace(meta, step=loaded_step, step_reason=reason)
    model = model_with_weights(
        meta.model, restore_arrays(ckpt, sharding), dtype=dtype, what=f"checkpoint {ckpt}"
    )
    model.eval()
    return model, meta
