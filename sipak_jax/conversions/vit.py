"""ViT weights from torchvision (``vit_b_16``) and timm (``vit_small_patch16_224``,
``vit_base_patch16_224``) state dicts -> ``sipak_jax.models.vit.ViT`` (``sipak_jax.conversions``
describes the interface).

Both libraries hold the same tensors under different names: the patch embedding
(``conv_proj`` / ``patch_embed.proj``), the class token, the position embedding
(``encoder.pos_embedding`` / ``pos_embed``), per block the two LayerNorms, the fused
``qkv`` projection (torch ``MultiheadAttention.in_proj_weight`` [3C, C], rows q, k, v; timm
``attn.qkv``: the same layout), the output projection, the MLP's two Linears (torchvision
``mlp.0`` / ``mlp.3``, timm ``mlp.fc1`` / ``mlp.fc2``), the final LayerNorm and the head
(``heads.head`` / ``head``). torch Linear weights are transposed, the patch convolution goes
to HWIO.

A file made for another image size (its position embedding holds another grid) converts to
a model of that size (``model_config`` reads the grid). A model built for another size than
the file gets the position embedding resampled as the file's own library would
(``sipak_jax.models.posembed``: timm's ``resample_abs_pos_embed``, torchvision's
``interpolate_embeddings``): ``resample_state`` does it for ``init_from`` too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

from sipak_jax.conversions import (
    ConversionError,
    identity,
    strict_state,
    torch_conv,
    torch_linear,
)
from sipak_jax.models import posembed
from sipak_jax.models.vit import VARIANTS


def _config(variant: str) -> dict:
    return {"name": "vit", "image_size": 224, **VARIANTS[variant], "num_classes": 1000,
            "head": "token"}  # fmt: skip


ARCHS = {
    ("torchvision", "vit_b_16"): _config("b16"),
    ("timm", "vit_small_patch16_224"): _config("s16"),
    ("timm", "vit_base_patch16_224"): _config("b16"),
}

# Per source: model leaf name -> file leaf name, and the top-level tensors.
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_TOP = {
    "torchvision": {
        "cls_token": "class_token",
        "pos_embed": "encoder.pos_embedding",
        "patch_embed/proj": "conv_proj",
        "norm": "encoder.ln",
        "fc": "heads.head",
    },
    "timm": {
        "cls_token": "cls_token",
        "pos_embed": "pos_embed",
        "patch_embed/proj": "patch_embed.proj",
        "norm": "norm",
        "fc": "head",
    },
}
_BLOCK = {
    "torchvision": {
        "norm1": "ln_1",
        "norm2": "ln_2",
        "attn/qkv": "self_attention.in_proj_",
        "attn/proj": "self_attention.out_proj",
        "mlp/fc1": "mlp.0",
        "mlp/fc2": "mlp.3",
    },
    "timm": {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn/qkv": "attn.qkv",
        "attn/proj": "attn.proj",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
    },
}
_BLOCK_PREFIX = {"torchvision": "encoder.layers.encoder_layer_{}.", "timm": "blocks.{}."}
_HEAD_KEY = {"torchvision": "heads.head.weight", "timm": "head.weight"}
_POS_KEY = {"torchvision": "encoder.pos_embedding", "timm": "pos_embed"}
_QKV_RE = re.compile(r"blocks/(\d+)/")


def file_key(source: str, path: str) -> tuple[str, str]:
    """(file key, how: 'conv' | 'linear' | 'none') of a model parameter path."""
    *module, leaf = path.split("/")
    module = "/".join(module)
    if path in ("cls_token", "pos_embed"):
        return _TOP[source][path], "none"
    m = _QKV_RE.match(path)
    if m:
        inner = module[m.end() :]
        name = _BLOCK_PREFIX[source].format(m.group(1)) + _BLOCK[source][inner]
    elif module in _TOP[source]:
        name = _TOP[source][module]
    else:  # e.g. an attention pool: no file has one; strict_state lists it as missing
        return f"(no {source} tensor for {path})", "none"
    if name.endswith("in_proj_"):  # torch MultiheadAttention: in_proj_weight / in_proj_bias
        key = name + _LEAVES[leaf]
    else:
        key = f"{name}.{_LEAVES[leaf]}"
    if leaf == "kernel":
        return key, "conv" if module == "patch_embed/proj" else "linear"
    return key, "none"


def _grid_of(pos: np.ndarray) -> int:
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ConversionError(f"position embedding of {n} patch tokens is not a square grid")
    return side


def model_config(source: str, arch: str, tensors: Mapping, path: str) -> dict:
    """The config of this file: the architecture of ``arch``, the image size its position
    embedding was made for, the number of classes of its head (0 for none)."""
    cfg = dict(ARCHS[(source, arch)])
    pos = tensors.get(_POS_KEY[source])
    if pos is None or pos.ndim != 3 or pos.shape[-1] != cfg["embed_dim"]:
        raise ConversionError(
            f"{path} is not a {source} {arch}: no {_POS_KEY[source]} of width "
            f"{cfg['embed_dim']} (found {None if pos is None else tuple(pos.shape)})."
        )
    cfg["image_size"] = _grid_of(pos) * cfg["patch_size"]
    head = tensors.get(_HEAD_KEY[source])
    cfg["num_classes"] = 0 if head is None else int(head.shape[0])
    return cfg


def _transform(how: str, pos_hw=None, style=None):
    if how == "conv":
        return torch_conv
    if how == "linear":
        return torch_linear
    if pos_hw is not None:
        return lambda x: posembed.resample_pos_embed(x, pos_hw, style)
    return identity


def to_state(source: str, tensors: Mapping[str, np.ndarray], model) -> dict:
    """Flat {model path: float32 array} for ``model`` from a timm / torchvision ViT state dict,
    strictly; the position embedding resampled to the model's grid when it differs."""
    from sipak_jax import model_io

    target = model_io.flatten(model_io.weights_state(model))

    def key_of(mpath):
        key, how = file_key(source, mpath)
        return key, _transform(how, model.grid if mpath == "pos_embed" else None, source)

    what = f"the {source} ViT file and {model.config()}"
    return strict_state(tensors, target, key_of, what=what)


def resample_state(flat: Mapping, grid: tuple[int, int], framework: str) -> dict:
    """A converted ViT's flat state with ``pos_embed`` resampled to ``grid`` the way
    ``framework`` (the weights' source library: 'timm' or 'torchvision') does it; what
    ``pretrained.init_from`` uses when the training image size differs from the weights'."""
    style = framework if framework in posembed.STYLES else "timm"
    out = dict(flat)
    out["pos_embed"] = posembed.resample_pos_embed(np.asarray(flat["pos_embed"]), grid, style)
    return out


def preprocessing(source: str, arch: str) -> dict:
    """timm's ViT weights (augreg) expect inputs scaled to [-1, 1] (mean = std = 0.5);
    torchvision's the ImageNet mean/std."""
    from sipak_jax import preprocessing as pp

    spec = pp.spec_for("torchvision", image_size=224, resize="stretch")
    if source == "timm":
        spec.update(mean=[127.5] * 3, std=[127.5] * 3)
    return spec


def eval_transform(source: str, arch: str) -> str:
    if source == "timm":
        return "resize shorter side to 248 (bicubic, crop_pct 0.9), centre crop 224"
    return "resize shorter side to 256 (bilinear), centre crop 224"
