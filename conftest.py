"""Shared test set-up.

`import tensorflow` followed by `import torchvision` kills the process (tensorflow-cpu 2.21 with
torchvision 0.29); the other order works. pytest imports test modules in an order we do not
control, so torchvision is imported here, before anything can import TensorFlow.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:  # noqa: SIM105 - the reference frameworks are test-only and optional for `import`
    import torchvision  # noqa: F401
except ImportError:
    pass
