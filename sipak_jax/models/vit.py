"""Vision Transformers (ViT-S/16, ViT-B/16) in Flax NNX, laid out so that timm and torchvision
ImageNet weights convert one to one (``sipak_jax.conversions.vit``).

The architecture of both references (Dosovitskiy et al. 2021; timm ``vit_*_patch16_224``,
torchvision ``vit_b_16``): 16 x 16 patches embedded by a strided linear map, a learned class
token, learned position embeddings added to every token, pre-norm blocks (LayerNorm eps 1e-6,
multi-head self-attention with one fused ``qkv`` projection laid out [q; k; v] as timm's
``attn.qkv`` and torch's ``in_proj_weight``, exact-erf GELU MLP), a final LayerNorm and a
linear head on the class token. Stochastic depth (``drop_path``, per block rising linearly
from 0 as in timm) and dropout before the head (``dropout_rate``) act in ``train()`` mode.

The position embeddings belong to one image size (``image_size // patch_size`` squared plus
the class token). Weights made for another size are resampled when they are loaded
(``sipak_jax.models.posembed``: bicubic, as timm / torchvision do), never inside the network.

``head``: ``"token"`` (the class token, as the references) or ``"attention"``
(``sipak_jax.models.heads.AttentionPool`` over the final patch-token grid; the class token is
then unused by the head, and ``attention_map(x)`` returns where it looked).

Saliency on the token grid. ``num_stages = 4`` groups of blocks: ``features(x, stage)`` is
the patch-token grid [B, h, w, C] (class token dropped) after the first
``depth * stage // 4`` blocks for stages 1..3, and at the INPUT of the last block for stage 4
(pytorch-grad-cam's advice for ViTs, ``target_layers=[blocks[-1].norm1]``: after the last
block only the class token reaches a token head, so patch-token gradients there are zero);
stage 0 is the embeddings. The class token of that point is what the later blocks need as
well: ``features_with_context(x, stage) -> (grid, class_token)`` and ``classify(h, stage,
context)`` run the rest, so ``classify(*features_with_context(x, s), s) == model(x)``; the
saliency module calls them (``sipak_jax.saliency.core``). ``attention_weights(x)`` gives
every block's attention probabilities for attention rollout (``saliency.attention``).

Parameters are float32; ``dtype`` is the computation type (softmax and LayerNorm statistics
in float32). Attribute names follow timm (``patch_embed``, ``cls_token``, ``pos_embed``,
``blocks/i/{norm1,attn/{qkv,proj},norm2,mlp/{fc1,fc2}}``, ``norm``), the classifier is ``fc``
(the project's head name everywhere: ``init_from`` keeps it, training gives it the head's
learning rate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sipak_jax.models.heads import AttentionPool, check_head

NUM_STAGES = 4
LN_EPS = 1e-6
HEADS = ("token", "attention")
# The published sizes (timm vit_small/base_patch16_224, torchvision vit_b_16).
VARIANTS = {
    "s16": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_dim": 1536},
    "b16": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072},
}
_ARCH_KEYS = ("image_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_dim")
_init = nnx.initializers.truncated_normal(0.02)


def _linear(cin, cout, dtype, rngs):
    return nnx.Linear(cin, cout, dtype=dtype, param_dtype=jnp.float32, kernel_init=_init, rngs=rngs)


def _layer_norm(dim, dtype, rngs):
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> embed_dim (a strided convolution, written as a matmul)."""

    def __init__(self, patch_size, embed_dim, *, dtype, rngs):
        p = patch_size
        self.patch_size = p
        self.proj = nnx.Conv(
            3, embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
            param_dtype=jnp.float32, rngs=rngs,
        )  # fmt: skip

    def __call__(self, x):
        b, h, w, c = x.shape
        p = self.patch_size
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, h // p, w // p, p * p * c)
        kernel = self.proj.kernel[...].astype(x.dtype).reshape(p * p * c, -1)
        return patches @ kernel + self.proj.bias[...].astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, dim, num_heads, *, dtype, rngs):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = _linear(dim, 3 * dim, dtype, rngs)
        self.proj = _linear(dim, dim, dtype, rngs)

    def __call__(self, x):
        """(output [B,N,C], attention probabilities [B,heads,N,N] float32)."""
        b, n, c = x.shape
        hd = c // self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * hd**-0.5
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, n, c)
        return self.proj(out), probs


class Mlp(nnx.Module):
    def __init__(self, dim, hidden, *, dtype, rngs):
        self.fc1 = _linear(dim, hidden, dtype, rngs)
        self.fc2 = _linear(hidden, dim, dtype, rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block; ``drop_path`` drops each sample's residual branch."""

    def __init__(self, dim, num_heads, mlp_dim, drop_path, *, dtype, rngs):
        self.norm1 = _layer_norm(dim, dtype, rngs)
        self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(dim, dtype, rngs)
        self.mlp = Mlp(dim, mlp_dim, dtype=dtype, rngs=rngs)
        # Stochastic depth = dropout of the whole branch per sample (mask broadcast over
        # tokens and channels, kept branches scaled by 1 / (1 - rate)).
        self.drop_path = (
            nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs) if drop_path > 0 else None
        )

    def _drop(self, y):
        return y if self.drop_path is None else self.drop_path(y)

    def __call__(self, x):
        return self.forward(x)[0]

    def forward(self, x):
        """(output, attention probabilities)."""
        y, probs = self.attn(self.norm1(x))
        x = x + self._drop(y)
        x = x + self._drop(self.mlp(self.norm2(x)))
        return x, probs


class ViT(nnx.Module):
    """A ViT classifier (module docstring).

    Args:
      num_classes: head size; 0 builds no head (``model(x)`` returns the pooled features).
      image_size: the square input size the position embeddings are made for.
      patch_size, embed_dim, depth, num_heads, mlp_dim: the architecture (``VARIANTS``).
      head: ``"token"`` or ``"attention"``.
      dropout_rate: dropout before the head (training mode only).
      drop_path: the last block's stochastic-depth rate (block i: ``drop_path * i/(depth-1)``).
      dtype: computation type; parameters stay float32.
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` when dropout or drop_path > 0).
    """

    num_stages = NUM_STAGES

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        head: str = "token",
        dropout_rate: float = 0.0,
        drop_path: float = 0.0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_head(head, HEADS)
        _check_arch(image_size, patch_size, embed_dim, depth, num_heads, mlp_dim, num_classes)
        self.image_size, self.patch_size, self.embed_dim = image_size, patch_size, embed_dim
        self.depth, self.num_heads, self.mlp_dim = depth, num_heads, mlp_dim
        self.num_classes, self.head, self.dtype = num_classes, head, dtype
        self.grid = (image_size // patch_size,) * 2
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim), jnp.float32))
        n = self.grid[0] * self.grid[1] + 1
        self.pos_embed = nnx.Param(_init(rngs.params(), (1, n, embed_dim), jnp.float32))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nnx.List(
            [Block(embed_dim, num_heads, mlp_dim, r, dtype=dtype, rngs=rngs) for r in rates]
        )
        self.norm = _layer_norm(embed_dim, dtype, rngs)
        self.attention_pool = (
            AttentionPool(embed_dim, dtype=dtype, rngs=rngs) if head == "attention" else None
        )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0 else None
        self.fc = _linear(embed_dim, num_classes, dtype, rngs) if num_classes > 0 else None

    # ---- the pieces -------------------------------------------------------------------------

    def embed(self, x: jax.Array) -> jax.Array:
        """Tokens [B, 1 + h*w, C]: the class token then the patches, position embeddings added."""
        if x.ndim != 4 or x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"this ViT takes [B, {self.image_size}, {self.image_size}, 3] images (its "
                f"position embeddings are for that size, model.image_size), got {x.shape}"
            )
        t = self.patch_embed(jnp.asarray(x, self.dtype))
        b, h, w, c = t.shape
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, c))
        t = jnp.concatenate([cls, t.reshape(b, h * w, c)], axis=1)
        return t + self.pos_embed[...].astype(self.dtype)

    def _stage_end(self, stage: int) -> int:
        """How many blocks run before ``stage``'s grid (module docstring)."""
        _check_stage(stage)
        if stage == NUM_STAGES:
            return self.depth - 1
        return self.depth * stage // NUM_STAGES

    def stage_name(self, stage: int) -> str:
        """Where ``stage``'s grid is taken, for people: "embeddings", "blocks 1-3", ...,
        "input of block 12" (blocks counted from 1)."""
        end = self._stage_end(stage)
        if stage == 0:
            return "embeddings"
        if stage == NUM_STAGES:
            return f"input of block {self.depth}"
        return f"blocks 1-{end}"

    def _grid(self, tokens):
        b, _, c = tokens.shape
        return tokens[:, 1:].reshape(b, *self.grid, c)

    def _pool(self, tokens):
        """Final norm and pooling -> [B, C] float32."""
        x = self.norm(tokens)
        if self.attention_pool is None:
            return x[:, 0].astype(jnp.float32)
        return self.attention_pool(self._grid(x))[0]

    def _head(self, pooled):
        if self.dropout is not None:
            pooled = self.dropout(pooled)
        if self.fc is None:
            return pooled
        return self.fc(pooled.astype(self.dtype)).astype(jnp.float32)

    # ---- the model interface (sipak_jax.models.registry) ------------------------------------

    def features_with_context(self, x: jax.Array, stage: int = NUM_STAGES):
        """(patch-token grid [B,h,w,C], class token [B,1,C]) at ``stage``."""
        t = self.embed(x)
        for block in self.blocks[: self._stage_end(stage)]:
            t = block(t)
        return self._grid(t), t[:, :1]

    def features(self, x: jax.Array, stage: int = NUM_STAGES) -> jax.Array:
        """The patch-token grid [B,h,w,C] at ``stage`` (0..4, module docstring)."""
        return self.features_with_context(x, stage)[0]

    def classify(self, h: jax.Array, stage: int = NUM_STAGES, context=None) -> jax.Array:
        """Logits (float32) from ``stage``'s grid and class token (``context``, from
        ``features_with_context``): the remaining blocks, the final norm, pooling, head."""
        if context is None:
            raise ValueError(
                "ViT.classify needs the class token of that stage: "
                "h, cls = model.features_with_context(x, stage); model.classify(h, stage, cls)"
            )
        b, gh, gw, c = h.shape
        t = jnp.concatenate([context.astype(self.dtype), h.reshape(b, gh * gw, c)], axis=1)
        for block in self.blocks[self._stage_end(stage) :]:
            t = block(t)
        return self._head(self._pool(t))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [B, num_classes] (float32) for normalised NHWC images."""
        t = self.embed(x)
        for block in self.blocks:
            t = block(t)
        return self._head(self._pool(t))

    def attention_weights(self, x: jax.Array) -> jax.Array:
        """Every block's attention probabilities [depth, B, heads, 1+h*w, 1+h*w] (float32)."""
        t = self.embed(x)
        probs = []
        for block in self.blocks:
            t, p = block.forward(t)
            probs.append(p)
        return jnp.stack(probs)

    def attention_map(self, x: jax.Array) -> jax.Array:
        """The attention head's weights [B,h,w] (each image sums to 1)."""
        if self.attention_pool is None:
            raise ValueError("this ViT has no attention head (model.head is 'token')")
        t = self.embed(x)
        for block in self.blocks:
            t = block(t)
        return self.attention_pool.weights(self._grid(self.norm(t)))

    @property
    def num_layer_ids(self) -> int:
        return self.depth + 2

    def layer_id(self, param_path: str) -> int:
        """Layer-wise decay group: 0 the embeddings (patch_embed, cls_token, pos_embed), i + 1
        block i, ``num_layer_ids - 1`` the final norm, the attention pool and ``fc``."""
        parts = str(param_path).split("/")
        if parts[0] in ("patch_embed", "cls_token", "pos_embed"):
            return 0
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1]) + 1
        if parts[0] in ("norm", "attention_pool", "fc"):
            return self.num_layer_ids - 1
        raise ValueError(f"{param_path!r} is not a parameter path of a ViT")

    def config(self) -> dict:
        """The model config ``registry.create`` rebuilds this architecture from."""
        out = {"name": "vit"}
        out.update({k: int(getattr(self, k)) for k in _ARCH_KEYS})
        out["num_classes"] = int(self.num_classes)
        out["head"] = self.head
        return out


def _check_stage(stage):
    if not isinstance(stage, int) or not 0 <= stage <= NUM_STAGES:
        raise ValueError(f"stage must be an int in 0..{NUM_STAGES}, got {stage!r}")


def _check_arch(image_size, patch_size, embed_dim, depth, num_heads, mlp_dim, num_classes):
    values = dict(
        image_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_dim=mlp_dim,
    )  # fmt: skip
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"field 'model.{key}': must be a positive integer, got {value!r}")
    if image_size % patch_size:
        raise ValueError(
            f"field 'model.image_size': {image_size} is not a multiple of the patch size "
            f"{patch_size}; use a multiple (e.g. {max(image_size // patch_size, 1) * patch_size})"
        )
    if embed_dim % num_heads:
        raise ValueError(f"field 'model.num_heads': {num_heads} does not divide {embed_dim}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"field 'model.num_classes': must be an integer >= 0, got {num_classes}")


# ---- The registry's family interface (sipak_jax.models.registry) -----------------------------

_CONFIG_KEYS = (*_ARCH_KEYS, "num_classes", "head")


def from_config(config, *, dtype=jnp.float32, dropout_rate=0.0, drop_path=0.0, rngs) -> ViT:
    """The ViT of a model config (``ViT.config()`` without ``name``)."""
    check_config(config)
    kwargs = {k: int(config[k]) for k in _ARCH_KEYS}
    return ViT(
        int(config["num_classes"]),
        head=config.get("head", "token"),
        dropout_rate=dropout_rate,
        drop_path=drop_path,
        dtype=dtype,
        rngs=rngs,
        **kwargs,
    )


def check_config(config) -> None:
    """Raises ValueError naming the first unusable field of a ViT model config."""
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    missing = [k for k in (*_ARCH_KEYS, "num_classes") if k not in config]
    if unknown or missing:
        raise ValueError(f"field 'model': unknown keys {unknown}, missing keys {missing}")
    check_head(config.get("head", "token"), HEADS)
    _check_arch(*(config[k] for k in _ARCH_KEYS), config["num_classes"])


def training_config(model, num_classes: int) -> dict:
    """The model config of a training config's ``config.model``: ``variant`` ('s16' or 'b16')
    gives the sizes unless ``embed_dim``/``depth``/``num_heads``/``mlp_dim``/``patch_size``
    are set (tiny test models); ``image_size`` (configs/vit_b16.py ties it to
    ``config.image_size``); ``head`` ('token' or 'attention')."""
    variant = model.get("variant") or "b16"
    if variant not in VARIANTS:
        raise ValueError(f"config.model.variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    out = {"name": "vit", "image_size": int(model.get("image_size") or 224)}
    for key, default in VARIANTS[variant].items():
        value = model.get(key)
        out[key] = int(value) if value else default
    out["num_classes"] = int(num_classes)
    out["head"] = model.get("head") or "token"
    check_config({k: v for k, v in out.items() if k != "name"})
    return out


def describe(config) -> str:
    """'ViT-B/16 at 224 px' (or the sizes of a non-standard one), with the head."""
    sizes = {k: config[k] for k in VARIANTS["b16"]}
    name = next((f"ViT-{v[0].upper()}/16" for v, s in VARIANTS.items() if s == sizes), None)
    if name is None:
        name = (
            f"ViT (patch {config['patch_size']}, dim {config['embed_dim']}, depth "
            f"{config['depth']}, heads {config['num_heads']})"
        )
    head = ", attention head" if config.get("head") == "attention" else ""
    return f"{name} at {config['image_size']} px{head}"
