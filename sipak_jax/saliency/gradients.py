"""Gradient saliency: vanilla gradient, gradient x input and SmoothGrad (mean, squared, VarGrad).

Every function returns per-pixel, per-channel attributions [B,H,W,C] (PAIR's layout) and runs
inside one jit; SmoothGrad evaluates all its noisy copies in chunks of `batch_size` images per
model call inside that jit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sipak_jax.saliency.core import ModelFunctions

SMOOTHGRAD_KINDS = ("mean", "squared", "vargrad")


def vanilla_gradient(fns: ModelFunctions, x, target, score="logit", state=None):
    """d score / d input [B,H,W,C] (Simonyan et al. 2014)."""
    grads, _ = fns.input_gradients(x, target, score, state)
    return grads


def gradient_x_input(fns: ModelFunctions, x, target, score="logit", state=None):
    """gradient * input [B,H,W,C] (Shrikumar et al. 2016)."""
    return vanilla_gradient(fns, x, target, score, state) * jnp.asarray(x, jnp.float32)


def map_batches(fn, xs, batch_size: int):
    """Apply `fn` (a function of a batch [n, ...] -> pytree with leading axis n) to `xs`
    [N, ...] in chunks of `batch_size` inside the caller's jit."""
    n = jax.tree.leaves(xs)[0].shape[0]
    bs = max(1, min(int(batch_size), n))
    n_chunks = -(-n // bs)
    pad = n_chunks * bs - n

    def split(a):
        a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)], axis=0) if pad else a
        return a.reshape((n_chunks, bs) + a.shape[1:])

    # A scan, unrolled when short: XLA:CPU ran the model about 2x slower inside a while loop.
    _, out = jax.lax.scan(
        lambda carry, chunk: (carry, fn(chunk)),
        None,
        jax.tree.map(split, xs),
        unroll=True if n_chunks <= 8 else 1,
    )
    return jax.tree.map(lambda a: a.reshape((n_chunks * bs,) + a.shape[2:])[:n], out)


def smoothgrad_noise(key, x, n_samples: int, sigma_spread: float = 0.15) -> jax.Array:
    """Gaussian noise [n_samples, B,H,W,C] with stdev `sigma_spread * (max - min)` per image."""
    x = jnp.asarray(x, jnp.float32)
    spread = jnp.max(x, axis=(1, 2, 3)) - jnp.min(x, axis=(1, 2, 3))
    stdev = sigma_spread * spread
    noise = jax.random.normal(key, (n_samples,) + x.shape, jnp.float32)
    return noise * stdev[None, :, None, None, None]


def smoothgrad(
    fns: ModelFunctions,
    x,
    target,
    score="logit",
    *,
    kind: str = "squared",
    n_samples: int = 25,
    sigma_spread: float = 0.15,
    seed: int = 0,
    noise=None,
    batch_size: int = 32,
    state=None,
):
    """SmoothGrad (Smilkov et al. 2017) [B,H,W,C].

    kind: 'mean' (average gradient), 'squared' (average squared gradient, PAIR's default
    `magnitude=True`), 'vargrad' (variance of the gradients, Adebayo et al. 2018).
    noise: optional [n_samples, B,H,W,C] array to replay a given noise (tests); otherwise drawn
    from `seed` with stdev `sigma_spread * (max - min)` of each image (PAIR's default 0.15).
    """
    if kind not in SMOOTHGRAD_KINDS:
        raise ValueError(f"SmoothGrad kind must be one of {SMOOTHGRAD_KINDS}, got {kind!r}")
    x = jnp.asarray(x, jnp.float32)
    if noise is None:
        noise = smoothgrad_noise(jax.random.key(seed), x, n_samples, sigma_spread)
    noise = jnp.asarray(noise, jnp.float32)
    if noise.shape[1:] != x.shape:
        raise ValueError(f"noise must be [n_samples, *{x.shape}], got {noise.shape}")
    fn = fns.cached(
        ("smoothgrad", score, kind, int(batch_size), noise.shape[0]),
        lambda: jax.jit(
            functools.partial(
                _smoothgrad_pure, fns, score=score, kind=kind, batch_size=int(batch_size)
            )
        ),
    )
    return fn(fns.state if state is None else state, x, target, noise)


def _smoothgrad_pure(fns, state, x, target, noise, *, score, kind, batch_size):
    n, b = noise.shape[:2]
    noisy = (x[None] + noise).reshape((n * b,) + x.shape[1:])
    targets = jnp.tile(target, n)

    def grads_of(batch):
        xs, ts = batch
        g, _ = fns.input_gradients_pure(state, xs, ts, score)
        return g

    grads = map_batches(grads_of, (noisy, targets), batch_size).reshape(noise.shape)
    if kind == "mean":
        return jnp.mean(grads, axis=0)
    if kind == "squared":
        return jnp.mean(grads * grads, axis=0)
    return jnp.var(grads, axis=0)


def replay_numpy_noise(x: np.ndarray, n_samples: int, sigma_spread: float, rng) -> np.ndarray:
    """The noise PAIR's `GetSmoothedMask` draws for one image (np.random.normal), batched as
    [n_samples, 1, H, W, C] for `smoothgrad(noise=...)`."""
    stdev = sigma_spread * (np.max(x) - np.min(x))
    return np.stack([rng.normal(0, stdev, x.shape) for _ in range(n_samples)])[:, None]
