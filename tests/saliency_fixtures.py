"""Tiny models and inputs shared by the saliency tests (not a test module)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sipak_jax.models import ResNet


def tiny_model(num_classes=5, seed=0, width=8):
    """A ResNet-18-shaped model with one block per stage, BatchNorm statistics moved away from
    their initial values (so that inference mode matters), in eval mode. A fresh copy of a
    cached build: building a model eagerly takes up to a minute on a loaded 2-core CPU."""
    return nnx.clone(_tiny_model(num_classes, seed, width))


@functools.cache
def _tiny_model(num_classes, seed, width):
    model = ResNet(18, num_classes, width=width, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(seed))
    stats = nnx.state(model, nnx.BatchStat)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 256))

    def move(path, a):
        k = next(keys)
        if path[-2].key == "var":
            return jax.random.uniform(k, a.shape, a.dtype, 0.5, 2.0)
        return jax.random.normal(k, a.shape, a.dtype) * 0.3

    nnx.update(model, jax.tree_util.tree_map_with_path(move, stats))
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


def draw_cells(n, size=48, seed=0):
    """Synthetic Pap-like cells: a pale cytoplasm disc on a light slide with a dark nucleus;
    class 0 has a small nucleus, class 1 a large one (only the nucleus tells them apart).
    Returns (uint8 RGB [n,size,size,3], labels [n], nucleus contours, cell contours), the
    contours as [K,2] (x, y) polygons in image pixels."""
    import cv2

    rng = np.random.default_rng(seed)
    imgs, labels, nucs, cells = [], [], [], []
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    for i in range(n):
        label = i % 2
        img = np.empty((size, size, 3), np.float32)
        img[...] = np.array([225, 222, 215]) + rng.normal(0, 4, 3)
        cx, cy = rng.uniform(0.38, 0.62, 2) * size
        r_cell = rng.uniform(0.28, 0.36) * size
        cell = np.stack(
            [
                cx + r_cell * np.cos(angles) * rng.uniform(0.9, 1.1, 24),
                cy + r_cell * np.sin(angles) * rng.uniform(0.9, 1.1, 24),
            ],
            1,
        )
        r_nuc = (rng.uniform(0.06, 0.085) if label == 0 else rng.uniform(0.12, 0.15)) * size
        ncx, ncy = cx + rng.uniform(-0.05, 0.05) * size, cy + rng.uniform(-0.05, 0.05) * size
        nuc = np.stack([ncx + r_nuc * np.cos(angles), ncy + r_nuc * np.sin(angles)], 1)
        cyto_colour = rng.uniform([150, 170, 190], [200, 210, 230])
        cv2.fillPoly(img, [np.rint(cell).astype(np.int32)], cyto_colour.tolist())
        cv2.fillPoly(img, [np.rint(nuc).astype(np.int32)], rng.uniform(40, 80, 3).tolist())
        img += rng.normal(0, 6, img.shape)
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(label)
        nucs.append(nuc.astype(np.float32))
        cells.append(cell.astype(np.float32))
    return np.stack(imgs), np.array(labels), nucs, cells


def train_tiny(images_u8, labels, spec, steps=150, seed=0):
    """A tiny ResNet trained on the synthetic cells (about a minute on 2 CPU cores)."""
    import optax

    from sipak_jax import preprocessing

    model = ResNet(18, 2, width=8, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(seed))
    model.train()
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    x_all = preprocessing.normalize(images_u8, spec)
    y_all = jnp.asarray(labels)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            logits = m(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(labels), 32, replace=False)
        step(model, opt, x_all[idx], y_all[idx])
    model.eval()
    return model
