"""Weight mappings from other frameworks, one module per model family (``sipak_jax.convert``
dispatches ``--source=S --arch=NAME`` to the module whose ``ARCHS`` holds ``(S, NAME)``).

A family module (``FAMILY_MODULES``; ResNet's mapping stays in ``sipak_jax.convert``) exposes:

- ``ARCHS: dict[tuple[source, arch], dict]``: the model config (``sipak_jax.models.registry``)
  of each architecture, under the source library's own model name
  (``("torchvision", "convnext_tiny")``);
- ``to_state(source, tensors, model) -> dict``: flat ``{"model/path": float32 array}`` for
  ``model`` (an abstract model is enough: only paths and shapes are read) from the file's
  tensors (``{name: np.ndarray}``), strictly: raises ``ConversionError`` listing every file
  tensor with no place, every model tensor the file lacks and every shape mismatch
  (``strict_state`` does this from a name mapping);

and optionally:

- ``model_config(source, arch, tensors, path) -> dict``: the config of this very file (for
  instance its number of classes, 0 for a headless file), raising ``ConversionError`` when the
  file is not ``arch``; default: ``ARCHS[(source, arch)]``;
- ``preprocessing(source, arch) -> dict``: the metadata ``preprocessing`` spec the weights
  expect; default: ImageNet mean/std, RGB, 224, ``stretch``
  (``sipak_jax.preprocessing.spec_for("torchvision")``);
- ``eval_transform(source, arch) -> str``: the source's own evaluation transform, recorded in
  the metadata for reference.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np

FAMILY_MODULES = ("sipak_jax.conversions.convnext", "sipak_jax.conversions.vit")


class ConversionError(ValueError):
    """The file cannot be converted; the message names the file and what to do."""


def family_modules() -> list:
    """The family modules that exist (a family still being written is skipped)."""
    out = []
    for name in FAMILY_MODULES:
        try:
            out.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return out


def find(source: str, arch: str):
    """The family module converting ``(source, arch)``, or None."""
    for module in family_modules():
        if (source, arch) in module.ARCHS:
            return module
    return None


def known_archs() -> list[tuple[str, str]]:
    """Every ``(source, arch)`` a family module converts."""
    return sorted(key for module in family_modules() for key in module.ARCHS)


# ---- Shared pieces of the mappings --------------------------------------------------------------


def torch_conv(x: np.ndarray) -> np.ndarray:
    """torch convolution kernel [O, I, kh, kw] -> HWIO (depthwise [C, 1, k, k] -> [k, k, 1, C])."""
    return np.transpose(x, (2, 3, 1, 0))


def torch_linear(x: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> [in, out]."""
    return x.T


def identity(x: np.ndarray) -> np.ndarray:
    return x


def strict_state(
    tensors: Mapping[str, np.ndarray],
    target: Mapping[str, object],
    key_of: Callable[[str], tuple[str, Callable]],
    *,
    ignored: Iterable[str] = (),
    what: str,
) -> dict[str, np.ndarray]:
    """Flat {model path: float32 array}: each model path's tensor through
    ``key_of(path) -> (file key, transform)``. Raises ``ConversionError`` (``what`` names the
    file and the model) listing every model tensor the file lacks, every file tensor with no
    place (except the ``ignored`` keys) and every shape mismatch."""
    from sipak_jax.model_io import mismatch_listing

    ignored = set(ignored)
    used, out, missing, misshaped = set(), {}, [], []
    for mpath, leaf in target.items():
        key, transform = key_of(mpath)
        if key not in tensors:
            missing.append(f"{key} (for {mpath} {tuple(leaf.shape)})")
            continue
        used.add(key)
        value = transform(np.asarray(tensors[key]))
        if tuple(value.shape) != tuple(leaf.shape):
            misshaped.append(
                f"{key} {tuple(np.shape(tensors[key]))} -> {mpath} {tuple(leaf.shape)}"
            )
            continue
        out[mpath] = np.asarray(value, dtype=np.float32)  # no copy when already float32
    unmatched = [f"{k} {tuple(np.shape(v))}" for k, v in tensors.items() if k not in used | ignored]
    if missing or unmatched or misshaped:
        raise ConversionError(
            f"{what} do not match one to one:\n"
            + mismatch_listing(
                ("tensors of the file with no place in the model", unmatched),
                ("tensors the model needs, missing from the file", missing),
                ("tensors with the wrong shape", misshaped),
            )
        )
    return out
