"""ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022) in Flax NNX, NHWC, laid out so
that torchvision's and timm's ImageNet weights convert one to one
(``sipak_jax.conversions.convnext``).

The network as both reference libraries build it:

- stem: 4x4 convolution, stride 4 (with bias), then LayerNorm over channels;
- four stages of ``depths[i]`` blocks at ``dims[i]`` channels; stages 2-4 start with a
  downsampling layer (LayerNorm, then a 2x2 convolution with stride 2);
- block: 7x7 depthwise convolution (bias) -> LayerNorm -> Linear (4x channels) -> GELU
  (exact, ``approximate=False``, as ``torch.nn.GELU()``) -> Linear -> layer scale (a learned
  per-channel factor, initialised to ``layer_scale_init`` = 1e-6) -> stochastic depth ->
  residual sum;
- head: global average pooling, LayerNorm, (dropout), Linear.

Every LayerNorm has epsilon 1e-6. Stochastic depth ("drop path", Huang et al. 2016) drops a
block's residual branch per sample with a rate rising linearly from 0 at the first block to
``drop_path`` at the last (torchvision's and timm's rule), scaling the kept ones by
``1 / (1 - rate)``; only in training mode. Parameters are float32; ``dtype`` is the
computation type; logits are float32.

Saliency: ``features(x, stage)`` is the output of stage ``stage`` (1..4; 0 is the stem) and
``classify(h, stage)`` the rest, so ``classify(features(x, s), s) == model(x)``. The stages
have the strides of a ResNet's (4, 8, 16, 32): at 224 px the last stage is 7x7, so
``saliency.overlay_stage`` picks stage 4 there, and stage 2 (8x8) at 64 px.

Layer-wise learning-rate decay (``layer_id``) groups parameters as the ConvNeXt authors'
fine-tuning code does (after BEiT): 0 the stem, 1 stage 1, 2 stage 2 with its downsampling,
3 stage 3's downsampling, then stage 3's blocks three at a time, then stage 4 with its
downsampling, and last the head (final LayerNorm and Linear). For ConvNeXt-S/B (27 blocks in
stage 3) that is the authors' 14 groups; shallower stage 3s get fewer groups instead of the
authors' unused ids.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sipak_jax.models import conv, heads

NUM_STAGES = 4
EPSILON = 1e-6
SIZES = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
HEADS = heads.HEADS

# Both reference libraries: truncated normal, std 0.02, for convolutions and linear layers.
_init = nnx.initializers.truncated_normal(stddev=0.02)


class _Layers:
    """Builds the layers of one model with shared settings."""

    def __init__(self, dtype, rngs):
        self.dtype = dtype
        self.rngs = rngs

    def conv(self, cin, cout, kernel, stride=1, groups=1):
        pad = (kernel - 1) // 2 if stride == 1 else 0
        return nnx.Conv(
            cin,
            cout,
            kernel_size=(kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=True,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_init,
            conv_general_dilated=conv.conv_general_dilated,
            rngs=self.rngs,
        )

    def norm(self, dim):
        return nnx.LayerNorm(
            dim,
            epsilon=EPSILON,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            rngs=self.rngs,
        )

    def linear(self, cin, cout):
        return nnx.Linear(
            cin, cout, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_init, rngs=self.rngs
        )


class Block(nnx.Module):
    """One ConvNeXt block (module docstring); ``drop_path`` is this block's rate."""

    def __init__(self, dim, layers: _Layers, *, drop_path: float, layer_scale_init: float):
        self.dwconv = layers.conv(dim, dim, 7, groups=dim)
        self.norm = layers.norm(dim)
        self.fc1 = layers.linear(dim, 4 * dim)
        self.fc2 = layers.linear(4 * dim, dim)
        self.layer_scale = nnx.Param(jnp.full((dim,), layer_scale_init, jnp.float32))
        # Stochastic depth: one keep/drop decision per sample (the mask broadcasts over H, W, C).
        self.drop_path = (
            nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=layers.rngs)
            if drop_path > 0
            else None
        )

    def __call__(self, x):
        y = self.norm(self.dwconv(x))
        y = self.fc2(jax.nn.gelu(self.fc1(y), approximate=False))
        y = y * self.layer_scale[...].astype(y.dtype)
        if self.drop_path is not None:
            y = self.drop_path(y)
        return x + y


class Downsample(nnx.Module):
    """LayerNorm, then a 2x2 convolution with stride 2 (between stages)."""

    def __init__(self, cin, cout, layers: _Layers):
        self.norm = layers.norm(cin)
        self.conv = layers.conv(cin, cout, 2, stride=2)

    def __call__(self, x):
        return self.conv(self.norm(x))


class ConvNeXt(nnx.Module):
    """A ConvNeXt classifier (module docstring).

    Args:
      depths, dims: blocks and channels per stage (4 each; ``SIZES`` has the published ones).
      num_classes: size of the head; 0 builds none (``model(x)`` is then the pooled,
        normalised features [B, dims[-1]], as timm's ``num_classes=0``).
      dropout_rate: dropout before the head (training mode only).
      drop_path: stochastic-depth rate of the last block (linear from 0; training mode only).
      layer_scale_init: initial layer-scale value (1e-6 in the paper).
      head: "gap" (global average pooling) or "attention" (``heads.AttentionPool``).
      dtype: computation type; parameters stay float32.
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for dropout / drop path).
    """

    num_stages = NUM_STAGES

    def __init__(
        self,
        depths,
        dims,
        num_classes: int,
        *,
        dropout_rate: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-6,
        head: str = "gap",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        _check_shape(depths, dims, num_classes, head, drop_path)
        self.depths, self.dims, self.num_classes = depths, dims, int(num_classes)
        self.head, self.dtype = head, dtype
        layers = _Layers(dtype, rngs)
        self.stem_conv = layers.conv(3, dims[0], 4, stride=4)
        self.stem_norm = layers.norm(dims[0])
        rates = [drop_path * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        for s in range(1, NUM_STAGES + 1):
            if s > 1:
                setattr(self, f"down{s}", Downsample(dims[s - 2], dims[s - 1], layers))
            first = sum(depths[: s - 1])
            blocks = [
                Block(
                    dims[s - 1],
                    layers,
                    drop_path=rates[first + i],
                    layer_scale_init=layer_scale_init,
                )
                for i in range(depths[s - 1])
            ]
            setattr(self, f"stage{s}", nnx.List(blocks))
        self.num_features = dims[-1]
        self.attention_pool = (
            heads.AttentionPool(dims[-1], dtype=dtype, rngs=rngs) if head == "attention" else None
        )
        self.norm = layers.norm(dims[-1])
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0 else None
        self.fc = layers.linear(dims[-1], num_classes) if num_classes > 0 else None

    # ---- Forward ------------------------------------------------------------------------------

    def _run_stage(self, x, s):
        if s > 1:
            x = getattr(self, f"down{s}")(x)
        for block in getattr(self, f"stage{s}"):
            x = block(x)
        return x

    def features(self, x: jax.Array, stage: int = NUM_STAGES) -> jax.Array:
        """Activations at the end of stage ``stage`` (1..4; 0: the stem), NHWC."""
        _check_stage(stage)
        x = self.stem_norm(self.stem_conv(jnp.asarray(x, self.dtype)))
        for s in range(1, stage + 1):
            x = self._run_stage(x, s)
        return x

    def pooled(self, h: jax.Array) -> jax.Array:
        """The last stage's activations [B,h,w,C] -> pooled float32 [B,C] (average, or the
        attention head's weighted sum)."""
        if self.attention_pool is not None:
            return self.attention_pool(h)[0].astype(jnp.float32)
        return jnp.mean(h.astype(jnp.float32), axis=(1, 2))

    def classify(self, h: jax.Array, stage: int = NUM_STAGES) -> jax.Array:
        """Logits (float32) from stage ``stage``'s activations: the later stages, pooling, the
        head's LayerNorm, dropout and Linear (or the normalised pooled features without one)."""
        _check_stage(stage)
        x = jnp.asarray(h, self.dtype)
        for s in range(stage + 1, NUM_STAGES + 1):
            x = self._run_stage(x, s)
        x = self.norm(self.pooled(x).astype(self.dtype))
        if self.dropout is not None:
            x = self.dropout(x)
        if self.fc is None:
            return x.astype(jnp.float32)
        return self.fc(x).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [B, num_classes] (float32) for normalised NHWC images."""
        return self.classify(self.features(x, NUM_STAGES), NUM_STAGES)

    def attention_map(self, x: jax.Array) -> jax.Array:
        """The attention head's weights [B,h,w] over the last stage (head "attention" only)."""
        if self.attention_pool is None:
            raise ValueError("this ConvNeXt has no attention head (model.head is 'gap')")
        return self.attention_pool.weights(self.features(x, NUM_STAGES))

    # ---- Registry interface -------------------------------------------------------------------

    @property
    def num_layer_ids(self) -> int:
        return 5 + math.ceil(self.depths[2] / 3)

    def layer_id(self, param_path: str) -> int:
        """Layer-wise learning-rate decay group of a parameter path (module docstring)."""
        top, *rest = str(param_path).split("/")
        last_stage = 3 + math.ceil(self.depths[2] / 3)
        if top.startswith("stem_"):
            return 0
        if top in ("stage1", "stage2", "down2"):
            return int(top[-1])
        if top == "down3":
            return 3
        if top == "stage3" and rest and rest[0].isdigit():
            return 3 + int(rest[0]) // 3
        if top in ("stage4", "down4"):
            return last_stage
        if top in ("norm", "fc", "attention_pool"):
            return last_stage + 1
        raise ValueError(f"{param_path!r} is not a parameter path of a ConvNeXt")

    def config(self) -> dict:
        """The model config ``sipak_jax.models.registry.create`` rebuilds this model from."""
        out = {
            "name": "convnext",
            "depths": list(self.depths),
            "dims": list(self.dims),
            "num_classes": self.num_classes,
        }
        if self.head != "gap":
            out["head"] = self.head
        return out


def _check_stage(stage):
    if not isinstance(stage, int) or not 0 <= stage <= NUM_STAGES:
        raise ValueError(f"stage must be an int in 0..{NUM_STAGES}, got {stage!r}")


def _check_shape(depths, dims, num_classes, head, drop_path):
    if len(depths) != NUM_STAGES or len(dims) != NUM_STAGES or min(depths + dims) < 1:
        raise ValueError(f"depths and dims must be 4 positive ints each, got {depths}, {dims}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if not 0 <= drop_path < 1:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")


# ---- The registry's family interface (sipak_jax.models.registry) -----------------------------

_CONFIG_KEYS = ("depths", "dims", "num_classes", "head")


def from_config(config, *, dtype=jnp.float32, dropout_rate=0.0, drop_path=0.0, rngs) -> ConvNeXt:
    """The ConvNeXt of a model config (depths, dims, num_classes, optional head)."""
    check_config(config)
    return ConvNeXt(
        config["depths"],
        config["dims"],
        int(config["num_classes"]),
        head=config.get("head", "gap"),
        dropout_rate=dropout_rate,
        drop_path=drop_path,
        dtype=dtype,
        rngs=rngs,
    )


def _fail(field: str, message: str):
    raise ValueError(f"field {field!r}: {message}")


def _positive_ints(value, n=NUM_STAGES) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    )


def check_config(config) -> None:
    """Raises ValueError naming the first unusable field of a ConvNeXt model config."""
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    missing = [k for k in _CONFIG_KEYS[:3] if k not in config]
    if unknown or missing:
        _fail("model", f"unknown keys {unknown}, missing keys {missing} (a ConvNeXt)")
    for key in ("depths", "dims"):
        if not _positive_ints(config[key]):
            _fail(f"model.{key}", f"must be 4 positive integers, got {config[key]!r}")
    n = config["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        _fail("model.num_classes", f"must be an integer >= 0, got {n!r}")
    if config.get("head", "gap") not in HEADS:
        _fail("model.head", f"must be one of {HEADS}, got {config['head']!r}")


def training_config(model, num_classes: int) -> dict:
    """The model config of a training config's ``config.model``: ``size`` (a ``SIZES`` key),
    ``depths`` / ``dims`` overriding it when set, ``head``."""
    size = model.get("size") or "tiny"
    if size not in SIZES:
        raise ValueError(f"config.model.size must be one of {sorted(SIZES)}, got {size!r}")
    depths = model.get("depths") or SIZES[size][0]
    dims = model.get("dims") or SIZES[size][1]
    out = {
        "name": "convnext",
        "depths": [int(d) for d in depths],
        "dims": [int(d) for d in dims],
        "num_classes": int(num_classes),
    }
    head = model.get("head") or "gap"
    if head != "gap":
        out["head"] = head
    return out


def size_name(config) -> str | None:
    """ "tiny", "small", ... when the config is a published size, else None."""
    for name, (depths, dims) in SIZES.items():
        if tuple(config["depths"]) == depths and tuple(config["dims"]) == dims:
            return name
    return None


def describe(config) -> str:
    """'ConvNeXt-T' for the published sizes, else the depths and dims."""
    size = size_name(config)
    name = (
        f"ConvNeXt-{size[0].upper()}"
        if size
        else (f"ConvNeXt depths {tuple(config['depths'])} dims {tuple(config['dims'])}")
    )
    head = config.get("head", "gap")
    return name if head == "gap" else f"{name}, {head} head"
