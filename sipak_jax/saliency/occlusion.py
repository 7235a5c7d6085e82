"""Occlusion (Zeiler & Fergus 2014) as PAIR computes it: slide a `size` x `size` window filled
with `value` over the image (stride 1 by default), and add the score drop
`f(x) - f(x occluded)` to every pixel the window covered. All windows are evaluated inside one
jit, `batch_size` occluded images per model call. Cost: one forward pass per window position
(((H - size) / stride + 1)^2), so use a stride on full-size images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sipak_jax.saliency.core import ModelFunctions
from sipak_jax.saliency.gradients import map_batches


def occlusion(
    fns: ModelFunctions,
    x,
    target,
    score="logit",
    *,
    size: int = 15,
    value: float = 0.0,
    stride: int = 1,
    batch_size: int = 64,
    state=None,
):
    """Occlusion map [B,H,W] (PAIR puts the same value on every channel)."""
    x = jnp.asarray(x, jnp.float32)
    _, h, w, _ = x.shape
    if not 1 <= size <= min(h, w):
        raise ValueError(f"occlusion window {size} must be between 1 and the image size {h}x{w}")
    fn = fns.cached(
        ("occlusion", score, int(size), float(value), int(stride), int(batch_size), h, w),
        lambda: jax.jit(
            functools.partial(
                _occlusion_pure, fns, score, int(size), float(value), int(stride), int(batch_size)
            )
        ),
    )
    return fn(fns.state if state is None else state, x, target)


def _occlusion_pure(fns, score, size, value, stride, batch_size, state, x, target):
    b, h, w, c = x.shape
    rows = jnp.arange(0, h - size + 1, stride)
    cols = jnp.arange(0, w - size + 1, stride)
    nr, nc = rows.shape[0], cols.shape[0]
    rr, cc = jnp.meshgrid(rows, cols, indexing="ij")
    pos_r = jnp.tile(rr.reshape(-1), b)
    pos_c = jnp.tile(cc.reshape(-1), b)
    img = jnp.repeat(jnp.arange(b), nr * nc)
    base = fns.score_pure(state, x, target, score)
    window = jnp.full((size, size, c), value, x.dtype)
    yy = jnp.arange(h)[:, None]
    xx = jnp.arange(w)[None, :]

    def scores_of(batch):
        bi, r0, c0 = batch
        inside = (
            (yy[None] >= r0[:, None, None])
            & (yy[None] < r0[:, None, None] + size)
            & (xx[None] >= c0[:, None, None])
            & (xx[None] < c0[:, None, None] + size)
        )
        occluded = jnp.where(inside[..., None], window[0, 0], x[bi])
        return fns.score_pure(state, occluded, target[bi], score)

    scores = map_batches(scores_of, (img, pos_r, pos_c), batch_size).reshape(b, nr, nc)
    drops = base[:, None, None] - scores
    # Spread each window's drop over the pixels it covered: place the drops on the window
    # origins and convolve with a size x size box.
    grid = jnp.zeros((b, h - size + 1, w - size + 1), x.dtype)
    grid = grid.at[:, ::stride, ::stride].set(drops)
    box = jnp.ones((size, size), x.dtype)
    return jax.vmap(lambda g: jax.scipy.signal.convolve2d(g, box, mode="full"))(grid)
