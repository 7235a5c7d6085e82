"""Model definitions (Flax NNX).

Importing this package asks XLA:CPU for its own convolutions instead of YNNPACK's
(``xla_cpu.prefer_eigen_convolutions``: faster training on CPUs, no effect elsewhere); it
takes effect when no JAX computation ran before the import.
"""

from sipak_jax.models import xla_cpu

xla_cpu.prefer_eigen_convolutions()

from sipak_jax.models.resnet import DEPTHS, VARIANTS, ResNet  # noqa: E402

__all__ = ["DEPTHS", "VARIANTS", "ResNet"]
