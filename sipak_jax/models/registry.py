"""The model families behind one interface: ``create(model_config)`` builds any of them.

A model config is the dict a model DIR's metadata stores under ``model`` (and what
``model.config()`` returns). ``model_config["name"]`` picks the family, one of ``FAMILIES``;
a config without ``name`` is a ResNet (what metadata written before the other families
held), and ResNet configs are still written without it.

Every family module (imported only when its family is asked for) provides:

- ``from_config(config, *, dtype, dropout_rate, drop_path, rngs) -> nnx.Module``: the model
  of a config (``name`` removed), randomly initialised;
- ``check_config(config) -> None``: raises ``ValueError`` naming the field (``model.<key>``)
  and what is allowed;
- ``training_config(model, num_classes) -> dict``: the model config of a training config's
  ``config.model`` section (a ConfigDict) for a ``num_classes`` head;
- ``describe(config) -> str``: a short human name ("ResNet-50 v1.5, width 64").

Every model (whatever the family) has:

- ``__call__(x [B,H,W,3] normalised) -> float32 logits [B,K]`` (pooled features [B,C] when
  ``num_classes`` is 0);
- ``num_stages: int``; ``features(x, stage) -> [B,h,w,C]`` and ``classify(h, stage) ->
  logits`` with ``classify(features(x, s), s) == model(x)`` (the CAM family,
  ``saliency.overlay_stage``);
- ``config()`` (a METHOD, as ``ResNet.config()`` always was): the dict ``create`` rebuilds it
  from (with ``name`` unless ResNet);
- nnx ``train()`` / ``eval()``; float32 parameters, ``dtype`` the computation type;
- ``layer_id(param_path) -> int`` and ``num_layer_ids`` for layer-wise learning-rate decay:
  ``param_path`` is the parameter's path in the model's state joined with ``/``
  (``"layer2/0/conv1/kernel"``), 0 is the stem / embeddings and ``num_layer_ids - 1`` the head.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

DEFAULT = "resnet"
_MODULES = {
    "resnet": "sipak_jax.models.resnet",
    "convnext": "sipak_jax.models.convnext",
    "vit": "sipak_jax.models.vit",
}
FAMILIES = tuple(_MODULES)


def family(model_config: Mapping) -> str:
    """The family of a model config (``name``; absent means ``DEFAULT``)."""
    if not isinstance(model_config, Mapping):
        raise ValueError(f"a model config is a dict, got {type(model_config).__name__}")
    name = model_config.get("name", DEFAULT)
    if name not in _MODULES:
        raise ValueError(f"field 'model.name': must be one of {FAMILIES}, got {name!r}")
    return name


def _module(name: str):
    return importlib.import_module(_MODULES[name])


def _without_name(model_config: Mapping) -> dict:
    return {k: v for k, v in model_config.items() if k != "name"}


def create(
    model_config: Mapping,
    *,
    dtype=jnp.float32,
    dropout_rate: float = 0.0,
    drop_path: float = 0.0,
    seed: int = 0,
) -> nnx.Module:
    """The model a config describes, randomly initialised (parameters from ``seed``, dropout
    and stochastic depth from ``seed + 1``). ``drop_path`` is the stochastic-depth rate of
    the families that have it (0 for ResNet, which has none)."""
    name = family(model_config)
    return _module(name).from_config(
        _without_name(model_config),
        dtype=dtype,
        dropout_rate=dropout_rate,
        drop_path=drop_path,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
    )


def abstract(model_config: Mapping, **kwargs) -> nnx.Module:
    """Like ``create`` with abstract arrays (no memory, no initialisation compute)."""
    return nnx.eval_shape(lambda: create(model_config, **kwargs))


def check_config(model_config: Mapping) -> None:
    """Raises ValueError naming the first unusable field of a model config."""
    name = family(model_config)
    _module(name).check_config(_without_name(model_config))


def training_config(model_section, num_classes: int) -> dict:
    """The model config of a training config's ``config.model`` (its ``name`` picks the
    family; absent means ResNet) with a ``num_classes`` head."""
    name = model_section.get("name", DEFAULT) or DEFAULT
    if name not in _MODULES:
        raise ValueError(f"config.model.name must be one of {FAMILIES}, got {name!r}")
    return _module(name).training_config(model_section, int(num_classes))


def describe(model_config: Mapping) -> str:
    """A short human name of the architecture ("ResNet-50 v1.5, width 64", "ConvNeXt-T")."""
    name = family(model_config)
    return _module(name).describe(_without_name(model_config))


def config_of(model: nnx.Module) -> dict:
    """``model.config()``: the model config ``create`` rebuilds ``model`` from."""
    cfg = model.config
    return dict(cfg() if callable(cfg) else cfg)
