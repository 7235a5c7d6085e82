"""Shared test set-up.

`import tensorflow` followed by `import torchvision` kills the process (tensorflow-cpu 2.21 with
torchvision 0.29); the other order works. pytest imports test modules in an order we do not
control, so torchvision is imported here, before anything can import TensorFlow.
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Training's persistent XLA cache (`config.compilation_cache_dir='auto'`): never the user's
# ~/.cache, one directory per pytest-xdist worker (jax writes entries without a lock), kept
# between sessions (entries are keyed by program, XLA flags and jaxlib: a stale one is a miss).
os.environ.setdefault(
    "SIPAK_JAX_XLA_CACHE",
    os.path.join(
        tempfile.gettempdir(),
        f"sipak_jax_test_xla_{os.getuid()}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}",
    ),
)

try:  # noqa: SIM105 - the reference frameworks are test-only and optional for `import`
    import torchvision  # noqa: F401
except ImportError:
    pass

import pytest  # noqa: E402 - after torchvision, on purpose


@pytest.fixture(scope="session")
def chromium():
    """Path of an installed Chromium ($CHROMIUM, else chromium / chromium-browser /
    google-chrome on PATH). None: the test is skipped with how to get one, or fails when
    SIPAK_REQUIRE_BROWSER=1 (`.ci/run`). Session scope: resolved before any module fixture, so
    a skipped browser test builds nothing."""
    from tests.browser import chromium_or_skip

    return chromium_or_skip()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Each test module compiles its own tiny models; dropping JAX's caches after the module
    keeps the suite's memory flat instead of growing with every compiled function."""
    yield
    import sys

    if "jax" in sys.modules:
        import gc

        sys.modules["jax"].clear_caches()
        gc.collect()
