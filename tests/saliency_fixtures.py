"""Tiny models and inputs shared by the saliency tests (not a test module)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sipak_jax.models import ResNet


def tiny_model(num_classes=5, seed=0, width=8):
    """A ResNet-18-shaped model with one block per stage, BatchNorm statistics moved away from
    their initial values (so that inference mode matters), in eval mode."""
    model = ResNet(18, num_classes, width=width, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(seed))
    model.train()
    warm = jax.random.normal(jax.random.key(seed + 100), (8, 32, 32, 3)) * 2.0 + 0.5
    model(warm)
    model.eval()
    return model


def images(n=1, size=32, seed=1):
    return np.asarray(jax.random.normal(jax.random.key(seed), (n, size, size, 3)), np.float32)


def pair_call_model_function(fns, target: int, score="logit", stage=4):
    """PAIR's `call_model_function` contract, served by the module's own jitted functions."""
    import saliency.core as pair

    def call(x_batch, call_model_args=None, expected_keys=None):
        x = jnp.asarray(np.asarray(x_batch), jnp.float32)
        t = jnp.full((x.shape[0],), target, jnp.int32)
        out = {}
        if pair.INPUT_OUTPUT_GRADIENTS in expected_keys:
            g, _ = fns.input_gradients(x, t, score)
            out[pair.INPUT_OUTPUT_GRADIENTS] = np.asarray(g, np.float64)
        if pair.CONVOLUTION_LAYER_VALUES in expected_keys:
            a, g, _ = fns.feature_gradients(x, t, score, stage)
            out[pair.CONVOLUTION_LAYER_VALUES] = np.asarray(a, np.float64)
            out[pair.CONVOLUTION_OUTPUT_GRADIENTS] = np.asarray(g, np.float64)
        if pair.OUTPUT_LAYER_VALUES in expected_keys:
            out[pair.OUTPUT_LAYER_VALUES] = np.asarray(fns.scores(x, t, score), np.float64)
        return out

    return call


def assert_close_to_reference(ours, ref, rtol=1e-4, atol_frac=1e-5):
    """The notes' tolerance: rtol plus an absolute tolerance relative to max |ref|."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = float(np.max(np.abs(ref)))
    assert scale > 0, "reference is all zeros: the test would prove nothing"
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol_frac * scale)
