"""Max pooling with a gradient XLA:CPU computes without scatters.

JAX differentiates ``reduce_window`` max through ``select_and_scatter_add``, which XLA:CPU
rewrites into a variadic ``reduce_window`` over four index arrays (one iota per dimension)
and a scatter: for ResNet's stem pooling at 64 px that was about 15% of a whole ResNet-18
training step. Here the forward pass is the same ``reduce_window`` and the gradient is
written with the window's shifted views: each input position receives the output gradient
of every window in which it is the FIRST maximum (in row-major window order), exactly what
``select_and_scatter_add`` (and PyTorch's ``max_pool2d``) do, ties included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _windows(xp, kernel, stride, out_hw):
    """The kernel's shifted views of a padded NHWC ``xp``, one [N, Ho, Wo, C] per tap, in
    row-major tap order."""
    n, _, _, c = xp.shape
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_hw
    return [
        lax.slice(
            xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _pool(x, kernel, stride, pads):
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, *kernel, 1), (1, *stride, 1), ((0, 0), *pads, (0, 0))
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, kernel=(3, 3), stride=(2, 2), pads=((1, 1), (1, 1))):
    """Max pooling of NHWC ``x`` (padding with -inf, like torch's ``MaxPool2d(padding=p)``)."""
    return _pool(x, kernel, stride, pads)


def _max_pool_fwd(x, kernel, stride, pads):
    y = _pool(x, kernel, stride, pads)
    return y, (x, y)


def _max_pool_bwd(kernel, stride, pads, res, g):
    x, y = res
    n, h, w, c = x.shape
    kw, (sh, sw), (ho, wo) = kernel[1], stride, y.shape[1:3]
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    hp, wp = xp.shape[1:3]
    dxp = jnp.zeros(xp.shape, g.dtype)
    taken = jnp.zeros(y.shape, bool)
    for t, window in enumerate(_windows(xp, kernel, stride, (ho, wo))):
        i, j = divmod(t, kw)
        first = (window == y) & ~taken
        taken = taken | first
        # Put this tap's share back where the window read it: a strided, offset placement.
        pad_cfg = (
            (0, 0, 0),
            (i, hp - i - sh * (ho - 1) - 1, sh - 1),
            (j, wp - j - sw * (wo - 1) - 1, sw - 1),
            (0, 0, 0),
        )
        dxp = dxp + lax.pad(jnp.where(first, g, 0).astype(g.dtype), jnp.zeros((), g.dtype), pad_cfg)
    (pt, _), (pl, _) = pads
    return (lax.slice(dxp, (0, pt, pl, 0), (n, pt + h, pl + w, c)),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
