"""Model definitions (Flax NNX)."""

from sipak_jax.models.resnet import DEPTHS, VARIANTS, ResNet

__all__ = ["DEPTHS", "VARIANTS", "ResNet"]
