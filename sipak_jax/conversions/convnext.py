"""torchvision and timm ConvNeXt state dicts -> ``sipak_jax.models.convnext.ConvNeXt``.

Both libraries build the same network (``sipak_jax.models.convnext``) under other names:

- ``stem_conv``, ``stem_norm``: torchvision ``features.0.0``, ``features.0.1``; timm
  ``stem.0``, ``stem.1``;
- ``down{s}/norm``, ``down{s}/conv``: ``features.{2s-2}.0``, ``.1``; timm
  ``stages.{s-1}.downsample.0``, ``.1``;
- ``stage{s}/{j}/dwconv``, ``norm``, ``fc1``, ``fc2``: ``features.{2s-1}.{j}.block.0``,
  ``.2``, ``.3``, ``.5``; timm ``stages.{s-1}.blocks.{j}.conv_dw``, ``norm``, ``mlp.fc1``,
  ``mlp.fc2``;
- ``stage{s}/{j}/layer_scale`` [C]: ``features.{2s-1}.{j}.layer_scale`` [C,1,1]; timm
  ``stages.{s-1}.blocks.{j}.gamma`` [C];
- the head's ``norm``, ``fc``: ``classifier.0``, ``classifier.2``; timm ``head.norm``,
  ``head.fc``.

Convolution kernels go from [O, I, kh, kw] to HWIO (depthwise [C, 1, 7, 7] to [7, 7, 1, C]),
Linear weights are transposed, LayerNorm ``weight`` is our ``scale``. The architecture (blocks
and channels per stage, classes) is read from the file and must be the one ``--arch`` names;
a file without a head (timm ``num_classes=0``) becomes a headless model. Both libraries
normalise with the ImageNet mean and standard deviation (RGB) at 224 px.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from sipak_jax.conversions import ConversionError, identity, strict_state, torch_conv, torch_linear
from sipak_jax.models.convnext import NUM_STAGES, SIZES

SOURCES = ("torchvision", "timm")
ARCHS = {
    (source, f"convnext_{size}"): {
        "name": "convnext",
        "depths": list(depths),
        "dims": list(dims),
        "num_classes": 1000,
    }
    for source in SOURCES
    for size, (depths, dims) in SIZES.items()
}
# torchvision's evaluation transforms (ConvNeXt_*_Weights.IMAGENET1K_V1): the resize before the
# 224 centre crop, bilinear.
_TORCHVISION_RESIZE = {"tiny": 236, "small": 230, "base": 232, "large": 232}
_IGNORED = re.compile(r".*\.num_batches_tracked$")

# Our module names -> the libraries' (the table in the module docstring).
_BLOCK = {
    "torchvision": {"dwconv": "block.0", "norm": "block.2", "fc1": "block.3", "fc2": "block.5"},
    "timm": {"dwconv": "conv_dw", "norm": "norm", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _module_key(source: str, parts: list[str]) -> str:
    top = parts[0]
    tv = source == "torchvision"
    if top in ("stem_conv", "stem_norm"):
        return ("features.0." if tv else "stem.") + ("0" if top == "stem_conv" else "1")
    if top.startswith("down"):
        s, sub = int(top[4:]), "0" if parts[1] == "norm" else "1"
        return f"features.{2 * s - 2}.{sub}" if tv else f"stages.{s - 1}.downsample.{sub}"
    if top.startswith("stage"):
        s, j = int(top[5:]), parts[1]
        block = f"features.{2 * s - 1}.{j}" if tv else f"stages.{s - 1}.blocks.{j}"
        if parts[2] == "layer_scale":
            return block
        return f"{block}.{_BLOCK[source][parts[2]]}"
    if top in ("norm", "fc"):
        if tv:
            return "classifier.0" if top == "norm" else "classifier.2"
        return f"head.{top}"
    raise ConversionError(f"no {source} name for the model tensor {'/'.join(parts)}")


def key_of(source: str, path: str):
    """(the file's tensor name, the transform into our layout) of a model path."""
    parts = path.split("/")
    module = _module_key(source, parts)
    if parts[-1] == "layer_scale":
        name = "layer_scale" if source == "torchvision" else "gamma"
        return f"{module}.{name}", lambda x: np.reshape(x, (-1,))
    leaf = parts[-1]
    if leaf == "kernel":
        return f"{module}.weight", (
            torch_linear if parts[-2] in ("fc", "fc1", "fc2") else torch_conv
        )
    return f"{module}.{_LEAF[leaf]}", identity


def to_state(source: str, tensors: Mapping[str, np.ndarray], model) -> dict:
    """Flat {model path: float32 array} for ``model`` from a torchvision or timm ConvNeXt state
    dict, strictly (``ConversionError`` listing every mismatch)."""
    from sipak_jax import model_io

    if source not in SOURCES:
        raise ConversionError(f"ConvNeXt weights come from {SOURCES}, not {source!r}.")
    target = model_io.flatten(model_io.weights_state(model))
    return strict_state(
        tensors,
        target,
        lambda path: key_of(source, path),
        ignored=[k for k in tensors if _IGNORED.match(k)],
        what=f"the {source} ConvNeXt file and {model.config()}",
    )


def _stage_blocks(source: str, tensors) -> list[set[int]]:
    pattern = (
        r"features\.([1357])\.(\d+)\.block\.0\.weight"
        if source == "torchvision"
        else r"stages\.([0-3])\.blocks\.(\d+)\.conv_dw\.weight"
    )
    blocks = [set() for _ in range(NUM_STAGES)]
    for k in tensors:
        m = re.fullmatch(pattern, k)
        if m:
            stage = (int(m.group(1)) - 1) // 2 if source == "torchvision" else int(m.group(1))
            blocks[stage].add(int(m.group(2)))
    return blocks


def infer_config(source: str, tensors: Mapping[str, np.ndarray], path: str) -> dict:
    """The model config a torchvision / timm ConvNeXt file holds (depths, dims, classes)."""
    blocks = _stage_blocks(source, tensors)
    depths = [len(b) for b in blocks]
    if min(depths) == 0:
        raise ConversionError(
            f"{path}: not a {source} ConvNeXt state dict (blocks per stage found: {depths})."
        )
    first = (
        "features.{}.0.block.0.weight"
        if source == "torchvision"
        else "stages.{}.blocks.0.conv_dw.weight"
    )
    stage_index = (lambda s: 2 * s + 1) if source == "torchvision" else (lambda s: s)
    dims = [int(np.shape(tensors[first.format(stage_index(s))])[0]) for s in range(NUM_STAGES)]
    head = "classifier.2.weight" if source == "torchvision" else "head.fc.weight"
    num_classes = int(np.shape(tensors[head])[0]) if head in tensors else 0
    return {"name": "convnext", "depths": depths, "dims": dims, "num_classes": num_classes}


def model_config(source: str, arch: str, tensors: Mapping[str, np.ndarray], path: str) -> dict:
    """The config of this file, which must hold the architecture ``arch`` names (any head)."""
    cfg = infer_config(source, tensors, path)
    want = ARCHS[(source, arch)]
    if cfg["depths"] != want["depths"] or cfg["dims"] != want["dims"]:
        raise ConversionError(
            f"{path} holds a ConvNeXt with depths {cfg['depths']} and dims {cfg['dims']}, not "
            f"{arch} (depths {want['depths']}, dims {want['dims']}); pass the --arch it is."
        )
    return cfg


def preprocessing(source: str, arch: str) -> dict:
    """ImageNet mean/std, RGB, 224 px (both libraries), stretched to the square."""
    from sipak_jax import preprocessing as pp

    return pp.spec_for("torchvision", image_size=224, resize="stretch")


def eval_transform(source: str, arch: str) -> str:
    size = arch.split("_", 1)[1]
    if source == "torchvision":
        return f"bilinear resize shorter side to {_TORCHVISION_RESIZE[size]}, centre crop 224"
    return (
        "timm pretrained_cfg of the tag: bicubic resize shorter side to 224 / crop_pct, centre "
        "crop 224 (crop_pct 0.95 for the default tag in12k_ft_in1k, 0.875 for fb_in1k)"
    )
