"""ResNet-18/34/50/101/152 in Flax NNX, laid out so that ImageNet weights convert one to one.

Two variants, the two that published ImageNet weights use:

- ``"v1"``: Keras applications (``keras.applications.ResNet50``): a downsampling bottleneck
  block puts stride 2 on its first 1x1 convolution; every convolution has a bias; BatchNorm
  epsilon 1.001e-5 and momentum 0.99.
- ``"v1.5"``: torchvision (``torchvision.models.resnet50``): stride 2 on the 3x3 convolution;
  convolutions without bias; BatchNorm epsilon 1e-5 and momentum 0.9 here (torchvision writes
  the same thing as ``momentum=0.1``: it weights the new batch, NNX weights the old average).

Images are NHWC, already normalised (``sipak_jax.preprocessing.normalize``). Parameters and
BatchNorm statistics are float32; ``dtype`` is the computation type (``jnp.bfloat16`` on
accelerators). Logits are returned as float32.

Saliency needs the activations of any stage and their gradients: ``features(x, stage)`` runs
the network up to the end of stage ``stage`` (1..4; 0 is the stem after max pooling) and
``classify(h, stage)`` runs the rest, so ``model.classify(model.features(x, s), s) ==
model(x)`` and ``jax.grad`` of ``classify`` is the gradient with respect to that stage.

Convolutions are ``nnx.Conv`` modules (parameters and tree paths as ever) computed through
``sipak_jax.models.conv.conv_general_dilated``, which writes 1x1 convolutions and those on
small maps as matrix products; the stem's max pooling has a scatter-free gradient
(``sipak_jax.models.pooling``). Both only change how XLA:CPU computes the same numbers.

Attribute names follow torchvision (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, blocks
``conv1/bn1/conv2/bn2[/conv3/bn3]``, shortcut ``downsample_conv``/``downsample_bn``, head
``fc``), so that ``sipak_jax.convert`` maps each tensor of a weights file by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sipak_jax.models import conv, heads, pooling

# depth -> (block kind, blocks per stage)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
VARIANTS = ("v1", "v1.5")
NUM_STAGES = 4

# Per variant: convolution bias, BatchNorm epsilon, BatchNorm momentum (NNX convention:
# running = momentum * running + (1 - momentum) * batch).
_VARIANT_SETTINGS = {
    "v1": {"conv_bias": True, "bn_epsilon": 1.001e-5, "bn_momentum": 0.99},
    "v1.5": {"conv_bias": False, "bn_epsilon": 1e-5, "bn_momentum": 0.9},
}

# He initialisation as torchvision does it (kaiming_normal_, mode="fan_out", relu).
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Layers:
    """Builds the convolutions and BatchNorms of one model with shared settings."""

    def __init__(self, *, conv_bias, bn_epsilon, bn_momentum, dtype, rngs):
        self.conv_bias = conv_bias
        self.bn_epsilon = bn_epsilon
        self.bn_momentum = bn_momentum
        self.dtype = dtype
        self.rngs = rngs

    def conv(self, cin, cout, kernel, stride=1):
        pad = (kernel - 1) // 2  # symmetric, as both Keras (ZeroPadding/SAME at stride 1) and torch
        return nnx.Conv(
            cin,
            cout,
            kernel_size=(kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=self.conv_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_conv_init,
            conv_general_dilated=conv.conv_general_dilated,
            rngs=self.rngs,
        )

    def bn(self, features):
        # Scale 1, bias 0: every residual branch is live in an untrained model (saliency of a
        # fresh model would otherwise see dead branches).
        return nnx.BatchNorm(
            features,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            rngs=self.rngs,
        )


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions (ResNet-18/34). Stride on the first; the variants differ only in
    convolution bias and BatchNorm settings."""

    expansion = 1

    def __init__(self, cin, width, stride, layers: _Layers):
        cout = width * self.expansion
        self.conv1 = layers.conv(cin, width, 3, stride)
        self.bn1 = layers.bn(width)
        self.conv2 = layers.conv(width, width, 3)
        self.bn2 = layers.bn(cout)
        if stride != 1 or cin != cout:
            self.downsample_conv = layers.conv(cin, cout, 1, stride)
            self.downsample_bn = layers.bn(cout)
        else:
            self.downsample_conv = None
            self.downsample_bn = None

    def __call__(self, x):
        shortcut = x
        if self.downsample_conv is not None:
            shortcut = self.downsample_bn(self.downsample_conv(x))
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels). ``v1`` strides the first 1x1, ``v1.5`` the 3x3."""

    expansion = 4

    def __init__(self, cin, width, stride, layers: _Layers, variant: str):
        cout = width * self.expansion
        s1, s2 = (stride, 1) if variant == "v1" else (1, stride)
        self.conv1 = layers.conv(cin, width, 1, s1)
        self.bn1 = layers.bn(width)
        self.conv2 = layers.conv(width, width, 3, s2)
        self.bn2 = layers.bn(width)
        self.conv3 = layers.conv(width, cout, 1)
        self.bn3 = layers.bn(cout)
        if stride != 1 or cin != cout:
            self.downsample_conv = layers.conv(cin, cout, 1, stride)
            self.downsample_bn = layers.bn(cout)
        else:
            self.downsample_conv = None
            self.downsample_bn = None

    def __call__(self, x):
        shortcut = x
        if self.downsample_conv is not None:
            shortcut = self.downsample_bn(self.downsample_conv(x))
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return jax.nn.relu(y + shortcut)


def _max_pool_3x3_s2(x):
    """3x3 max pooling, stride 2, padding 1 (torch's MaxPool2d(3, 2, 1); Keras pads with zeros
    after a ReLU, which gives the same result because the input is non-negative)."""
    return pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))


class ResNet(nnx.Module):
    """A ResNet classifier (see the module docstring for the variants).

    Args:
      depth: 18, 34, 50, 101 or 152 (picks the block kind and, unless ``stage_sizes`` is
        given, the number of blocks per stage).
      num_classes: size of the head. 0 builds no head: ``model(x)`` then returns the pooled
        features [B, C] (what a Keras ``_notop`` file converts to).
      variant: ``"v1.5"`` (torchvision) or ``"v1"`` (Keras).
      width: channels of the stem and of the first stage's blocks (64 in the real networks;
        8 makes a tiny test model).
      dropout_rate: dropout before the head (training mode only).
      dtype: computation type; parameters and statistics stay float32.
      stage_sizes: blocks per stage, overriding the depth table (e.g. ``(1, 1, 1, 1)``).
      bn_momentum: overrides the variant's BatchNorm momentum (NNX convention).
      head: ``"gap"`` (global average pooling, the default) or ``"attention"``
        (``sipak_jax.models.heads.AttentionPool`` over the last stage; ``attention_map(x)``).
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` when ``dropout_rate > 0``).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        variant: str = "v1.5",
        width: int = 64,
        dropout_rate: float = 0.0,
        dtype=jnp.float32,
        stage_sizes: tuple[int, ...] | None = None,
        bn_momentum: float | None = None,
        head: str = "gap",
        rngs: nnx.Rngs,
    ):
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        if variant not in VARIANTS:
            raise ValueError(f"ResNet variant must be one of {VARIANTS}, got {variant!r}")
        kind, default_sizes = DEPTHS[depth]
        stage_sizes = tuple(default_sizes if stage_sizes is None else stage_sizes)
        if len(stage_sizes) != NUM_STAGES or min(stage_sizes) < 1:
            raise ValueError(f"stage_sizes must be 4 positive ints, got {stage_sizes!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        settings = dict(_VARIANT_SETTINGS[variant])
        if bn_momentum is not None:
            settings["bn_momentum"] = bn_momentum

        self.depth = depth
        self.variant = variant
        self.width = width
        self.num_classes = num_classes
        self.stage_sizes = stage_sizes
        self.dtype = dtype

        layers = _Layers(dtype=dtype, rngs=rngs, **settings)
        self.conv1 = layers.conv(3, width, 7, 2)
        self.bn1 = layers.bn(width)

        cin = width
        for stage, n_blocks in enumerate(stage_sizes, start=1):
            w = width * 2 ** (stage - 1)
            blocks = []
            for i in range(n_blocks):
                stride = 2 if (i == 0 and stage > 1) else 1
                if kind == "basic":
                    block = BasicBlock(cin, w, stride, layers)
                else:
                    block = Bottleneck(cin, w, stride, layers, variant)
                blocks.append(block)
                cin = w * block.expansion
            setattr(self, f"layer{stage}", nnx.List(blocks))
        self.num_features = cin

        self.head = heads.check_head(head)
        self.attention_pool = (
            heads.AttentionPool(cin, dtype=dtype, rngs=rngs) if head == "attention" else None
        )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0 else None
        if num_classes > 0:
            self.fc = nnx.Linear(cin, num_classes, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        else:
            self.fc = None

    def _stage(self, stage: int):
        return getattr(self, f"layer{stage}")

    def features(self, x: jax.Array, stage: int = 4) -> jax.Array:
        """Activations at the end of stage ``stage`` (1..4; 0: the stem after max pooling)."""
        _check_stage(stage)
        x = jnp.asarray(x, self.dtype)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = _max_pool_3x3_s2(x)
        for s in range(1, stage + 1):
            for block in self._stage(s):
                x = block(x)
        return x

    def classify(self, h: jax.Array, stage: int = 4) -> jax.Array:
        """Logits (float32) from stage ``stage``'s activations: the later stages, global average
        pooling, dropout and the head (or the pooled features when there is no head)."""
        _check_stage(stage)
        x = jnp.asarray(h, self.dtype)
        for s in range(stage + 1, NUM_STAGES + 1):
            for block in self._stage(s):
                x = block(x)
        if self.attention_pool is None:
            x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        else:
            x = self.attention_pool(x)[0]
        if self.dropout is not None:
            x = self.dropout(x)
        if self.fc is None:
            return x
        return self.fc(x.astype(self.dtype)).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [B, num_classes] (float32) for normalised NHWC images."""
        return self.classify(self.features(x, NUM_STAGES), NUM_STAGES)

    def attention_map(self, x: jax.Array) -> jax.Array:
        """The attention head's weights [B,h,w] over the last stage (each image sums to 1)."""
        if self.attention_pool is None:
            raise ValueError("this ResNet has no attention head (model.head is 'gap')")
        return self.attention_pool.weights(self.features(x, NUM_STAGES))

    num_stages = NUM_STAGES
    num_layer_ids = NUM_STAGES + 2

    def layer_id(self, param_path: str) -> int:
        """Layer-wise learning-rate decay group of a parameter path (``"layer2/0/conv1/kernel"``):
        0 the stem (``conv1``, ``bn1``), 1..4 the stages, ``num_layer_ids - 1`` the head."""
        top = str(param_path).split("/")[0]
        if top in ("conv1", "bn1"):
            return 0
        if top.startswith("layer") and top[len("layer") :].isdigit():
            return int(top[len("layer") :])
        if top in ("fc", "attention_pool"):
            return self.num_layer_ids - 1
        raise ValueError(f"{param_path!r} is not a parameter path of a ResNet")

    def config(self) -> dict:
        """The constructor arguments that rebuild this architecture (metadata ``model``)."""
        out = {
            "depth": self.depth,
            "variant": self.variant,
            "num_classes": self.num_classes,
            "width": self.width,
        }
        if self.stage_sizes != DEPTHS[self.depth][1]:
            out["stage_sizes"] = list(self.stage_sizes)
        if self.head != "gap":  # written only when set: older metadata stays as it was
            out["head"] = self.head
        return out


def _check_stage(stage):
    if not isinstance(stage, int) or not 0 <= stage <= NUM_STAGES:
        raise ValueError(f"stage must be an int in 0..{NUM_STAGES}, got {stage!r}")


# ---- The registry's family interface (sipak_jax.models.registry) -----------------------------

_CONFIG_KEYS = ("depth", "variant", "num_classes", "width", "stage_sizes", "head")


def from_config(config, *, dtype=jnp.float32, dropout_rate=0.0, drop_path=0.0, rngs) -> ResNet:
    """The ResNet of a model config (depth, variant, num_classes, width, optional
    stage_sizes). ``drop_path`` must be 0: these ResNets have no stochastic depth."""
    if drop_path:
        raise ValueError(
            f"config.model.drop_path={drop_path}: ResNet has no stochastic depth; set it to 0."
        )
    try:
        depth, variant, num_classes = config["depth"], config["variant"], config["num_classes"]
    except KeyError as e:
        raise ValueError(
            f"model config lacks {e.args[0]!r} (has {sorted(config)}); a ResNet needs depth, "
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
        head=config.get("head", "gap"),
        rngs=rngs,
    )


def _fail(field: str, message: str):
    raise ValueError(f"field {field!r}: {message}")


def check_config(config) -> None:
    """Raises ValueError naming the first unusable field of a ResNet model config."""
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    missing = [k for k in _CONFIG_KEYS[:4] if k not in config]
    if unknown or missing:
        _fail("model", f"unknown keys {unknown}, missing keys {missing}")
    if not isinstance(config["depth"], int) or config["depth"] not in DEPTHS:
        _fail("model.depth", f"must be one of {sorted(DEPTHS)}, got {config['depth']!r}")
    if config["variant"] not in VARIANTS:
        _fail("model.variant", f"must be one of {VARIANTS}, got {config['variant']!r}")
    for key, low in (("num_classes", 0), ("width", 1)):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            _fail(f"model.{key}", f"must be an integer >= {low}, got {value!r}")
    sizes = config.get("stage_sizes")
    if sizes is not None and (
        not isinstance(sizes, (list, tuple))
        or len(sizes) != NUM_STAGES
        or not all(isinstance(n, int) and n >= 1 for n in sizes)
    ):
        _fail("model.stage_sizes", f"must be null or 4 positive integers, got {sizes!r}")
    heads.check_head(config.get("head", "gap"))


def training_config(model, num_classes: int) -> dict:
    """The model config of a training config's ``config.model`` (depth, variant, width,
    stage_sizes), as ``ResNet.config()`` writes it."""
    out = {
        "depth": int(model.depth),
        "variant": model.variant,
        "num_classes": int(num_classes),
        "width": int(model.width),
    }
    sizes = model.get("stage_sizes")
    if sizes and tuple(sizes) != DEPTHS[out["depth"]][1]:
        out["stage_sizes"] = [int(n) for n in sizes]
    head = model.get("head") or "gap"
    if heads.check_head(head) != "gap":
        out["head"] = head
    return out


def describe(config) -> str:
    """'ResNet-50 v1.5, width 64' (and the blocks per stage when not the depth's)."""
    sizes = config.get("stage_sizes")
    stages = f", stages {tuple(sizes)}" if sizes else ""
    head = ", attention head" if config.get("head") == "attention" else ""
    return f"ResNet-{config['depth']} {config['variant']}, width {config['width']}{stages}{head}"
