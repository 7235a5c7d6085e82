"""XLA:CPU settings that the ResNets train faster with (no effect on GPU/TPU computations).

``prefer_eigen_convolutions()`` adds ``--xla_cpu_experimental_ynn_fusion_type=
-individual_convolution`` to ``XLA_FLAGS``: XLA:CPU (jaxlib 0.10) hands convolutions to
YNNPACK by default, whose kernel gradients (a convolution with the whole feature map as its
window) ran 3-4x slower than the forward pass and needed transposed copies of the
activations; without it XLA's own (Eigen) convolutions do forward, input gradient and kernel
gradient at about the same speed. Measured on a 2-core AVX-512 CPU: a ResNet-18 training step
at 224 px 1.4x faster, ResNet-50 1.3x (``benchmarks/model.py``). Matrix products stay with
YNNPACK. Results are equal within float rounding (another summation order).

XLA reads ``XLA_FLAGS`` once, when its CPU client starts: the flag only takes effect if no
JAX computation ran before. It is left out when the user's ``XLA_FLAGS`` already set this
option (theirs wins) and on jaxlib versions it was not checked on (an unknown flag aborts
XLA).
"""

from __future__ import annotations

import os

YNN_FUSION_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS_FLAG = f"{YNN_FUSION_OPTION}=-individual_convolution"
# jaxlib versions whose XLA knows the option (an unknown option in XLA_FLAGS is fatal).
CHECKED_JAXLIB_VERSIONS = ("0.10.2",)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume not started
        return False


def prefer_eigen_convolutions() -> bool:
    """Puts ``EIGEN_CONVOLUTIONS_FLAG`` into ``XLA_FLAGS`` when it can still take effect.

    Returns whether the flag is in effect for computations compiled from now on."""
    flags = os.environ.get("XLA_FLAGS", "")
    if EIGEN_CONVOLUTIONS_FLAG in flags.split():
        return True
    if YNN_FUSION_OPTION in flags:
        return False  # the user chose a setting of their own
    import jaxlib.version

    if jaxlib.version.__version__ not in CHECKED_JAXLIB_VERSIONS or _backends_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS_FLAG}".strip()
    return True
