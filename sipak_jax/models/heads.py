"""Pooling heads shared by every family: global average pooling or a learned attention pooling.

``model_config["head"] == "attention"`` replaces a model's global average pooling (ResNet,
ConvNeXt) or its class token (ViT) by ``AttentionPool``: a learned spatial attention over
the last feature map or token grid, ``weights = softmax_{positions}(v . tanh(W x + b))``
(the gated-free attention pooling of Ilse et al. 2018, "Attention-based deep multiple
instance learning"), ``pooled = sum_positions weights * x``. The weights [B,h,w] sum to 1
per image and are the model's own answer to "where did you look" (``model.attention_map``,
``saliency`` method ``attention_head``).

The score layer starts at zero, so a freshly built attention head pools exactly like global
average pooling (uniform weights); training moves it away from there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

HEADS = ("gap", "attention")


def check_head(head, allowed=HEADS) -> str:
    """``head`` if it is one of ``allowed``, else ValueError naming ``model.head``."""
    if head not in allowed:
        raise ValueError(f"field 'model.head': must be one of {allowed}, got {head!r}")
    return head


class AttentionPool(nnx.Module):
    """Learned attention pooling of a [B,h,w,C] map (module docstring).

    Args:
      channels: C.
      hidden: width of the attention MLP (default ``max(channels // 4, 8)``).
      dtype: computation type of the projections; the softmax and the pooling are float32.
    """

    def __init__(self, channels: int, hidden: int | None = None, *, dtype=jnp.float32, rngs):
        hidden = int(hidden or max(channels // 4, 8))
        self.channels = int(channels)
        self.proj = nnx.Linear(channels, hidden, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.score = nnx.Linear(
            hidden,
            1,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )

    def weights(self, x: jax.Array) -> jax.Array:
        """Attention weights [B,h,w] (float32, each image's sum is 1)."""
        b, h, w, _ = x.shape
        logits = self.score(jnp.tanh(self.proj(x)))[..., 0].astype(jnp.float32)
        return jax.nn.softmax(logits.reshape(b, h * w), axis=-1).reshape(b, h, w)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(pooled [B,C] float32, weights [B,h,w] float32) of a [B,h,w,C] map."""
        a = self.weights(x)
        pooled = jnp.einsum("bhw,bhwc->bc", a, x.astype(jnp.float32))
        return pooled, a
