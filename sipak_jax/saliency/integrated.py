"""Integrated Gradients (Sundararajan et al. 2017) and Blur IG (Xu et al. 2020).

All steps of the path are evaluated inside one jit (`lax.scan` over chunks of path points,
`batch_size` images per model call), so a 64-step IG is one compiled call.

IG returns the attributions [B,H,W,C] and the *completeness gap*: the relative difference
between the attributions' sum and f(x) - f(baseline), `|sum - delta| / max(|delta|, eps)`.
`integrated_gradients_adaptive` doubles the number of steps (64, 128, ...) until every image's
gap is under a target (5% by default).

Quadrature rules: 'pair' (PAIR's: `linspace(0, 1, n)` including both ends, divided by n; the
default so that results equal PAIR's), 'trapezoid' (weights summing to 1), 'gausslegendre'
(Captum's default), 'riemann_middle'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sipak_jax.saliency import imageops
from sipak_jax.saliency.core import ModelFunctions

RULES = ("pair", "trapezoid", "gausslegendre", "riemann_middle")
BASELINES = ("zeros", "black", "white", "black_white", "background", "blurred")


def quadrature(steps: int, rule: str = "pair") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of an n-step rule on [0, 1]."""
    if steps < 1:
        raise ValueError(f"IG steps must be >= 1, got {steps}")
    if rule == "pair":
        return np.linspace(0.0, 1.0, steps), np.full(steps, 1.0 / steps)
    if rule == "trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs at least 2 steps")
        a = np.linspace(0.0, 1.0, steps)
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return a, w
    if rule == "gausslegendre":
        a, w = np.polynomial.legendre.leggauss(steps)
        return (a + 1) / 2, w / 2
    if rule == "riemann_middle":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    raise ValueError(f"IG rule must be one of {RULES}, got {rule!r}")


def _input_value(pixel: float, spec) -> np.ndarray:
    """The normalised input value [C] of a grey level on every channel (0 black, 255 white)."""
    from sipak_jax import preprocessing  # the one normalisation of the project

    img = np.full((1, 1, 1, 3), pixel, np.uint8)
    return np.asarray(preprocessing.normalize(img, spec), np.float32).reshape(-1)


def make_baselines(x, name: str = "zeros", spec=None, blur_sigma: float = 10.0) -> list:
    """IG baselines for normalised images `x` [B,H,W,C] as a list of [B,H,W,C] arrays (IG is
    averaged over the list).

    'zeros': 0 in normalised space (PAIR's default; the dataset's mean colour).
    'black' / 'white' / 'black_white': a black (0), white (255) image or both (averaged); need
      `spec`, the model DIR's `preprocessing` dict, to map the grey level into input space.
    'background': each image filled with the median colour of its border (the slide around the
      cell; the pad colour).
    'blurred': each image blurred with a Gaussian of `blur_sigma` input pixels.
    A black baseline erases the dark Pap-stained nuclei, the very pixels of interest.
    """
    x = jnp.asarray(x, jnp.float32)
    if name == "zeros":
        return [jnp.zeros_like(x)]
    if name in ("black", "white", "black_white"):
        if spec is None:
            raise ValueError(
                f"baseline {name!r} needs the model's preprocessing spec (metadata "
                "'preprocessing') to know what black and white are in input space"
            )
        levels = {"black": [0], "white": [255], "black_white": [0, 255]}[name]
        return [jnp.broadcast_to(jnp.asarray(_input_value(v, spec)), x.shape) for v in levels]
    if name == "background":
        border = jnp.concatenate(
            [x[:, 0, :, :], x[:, -1, :, :], x[:, :, 0, :], x[:, :, -1, :]], axis=1
        )
        colour = jnp.median(border, axis=1)
        return [jnp.broadcast_to(colour[:, None, None, :], x.shape)]
    if name == "blurred":
        return [imageops.gaussian_blur(x, blur_sigma, mode="reflect")]
    raise ValueError(f"IG baseline must be one of {BASELINES} or an array, got {name!r}")


def integrated_gradients(
    fns: ModelFunctions,
    x,
    target,
    score="logit",
    *,
    baseline="zeros",
    steps: int = 25,
    rule: str = "pair",
    batch_size: int = 32,
    spec=None,
    state=None,
):
    """IG [B,H,W,C] and the completeness gap [B] (averaged over several baselines if the
    baseline names several; `baseline` may also be an array [B,H,W,C] or a list of them).

    Returns (attributions, info) with info = {'gap': [B], 'delta': [B] f(x) - f(b),
    'sum': [B] sum of attributions, 'steps': steps}."""
    x = jnp.asarray(x, jnp.float32)
    if isinstance(baseline, str):
        baselines = make_baselines(x, baseline, spec)
    elif isinstance(baseline, list | tuple):
        baselines = [jnp.asarray(b, jnp.float32) for b in baseline]
    else:
        baselines = [jnp.asarray(baseline, jnp.float32)]
    for b in baselines:
        if b.shape != x.shape:
            raise ValueError(f"IG baseline shape {b.shape} differs from the images' {x.shape}")
    alphas, weights = quadrature(int(steps), rule)
    fn = fns.cached(
        ("ig", score, int(steps), rule, int(batch_size)),
        lambda: jax.jit(
            functools.partial(
                _ig_pure, fns, alphas=alphas, weights=weights, score=score, batch_size=batch_size
            )
        ),
    )
    st = fns.state if state is None else state
    attrs, sums, deltas = [], [], []
    for b in baselines:
        a, s, d = fn(st, x, b, target)
        attrs.append(a)
        sums.append(s)
        deltas.append(d)
    attr = sum(attrs) / len(attrs)
    total = sum(sums) / len(sums)
    delta = sum(deltas) / len(deltas)
    gap = jnp.abs(total - delta) / jnp.maximum(jnp.abs(delta), 1e-12)
    return attr, {"gap": gap, "delta": delta, "sum": total, "steps": int(steps)}


def _ig_pure(fns, state, x, baseline, target, *, alphas, weights, score, batch_size):
    b = x.shape[0]
    per_call = max(1, int(batch_size) // b)
    n = len(alphas)
    n_chunks = -(-n // per_call)
    pad = n_chunks * per_call - n
    a = np.concatenate([alphas, np.zeros(pad)]).reshape(n_chunks, per_call).astype(np.float32)
    w = np.concatenate([weights, np.zeros(pad)]).reshape(n_chunks, per_call).astype(np.float32)
    diff = x - baseline

    def body(acc, chunk):
        ca, cw = chunk
        pts = baseline[None] + ca[:, None, None, None, None] * diff[None]
        pts = pts.reshape((per_call * b,) + x.shape[1:])
        g, _ = fns.input_gradients_pure(state, pts, jnp.tile(target, per_call), score)
        g = g.reshape((per_call,) + x.shape)
        return acc + jnp.tensordot(cw, g, axes=1), None

    total, _ = jax.lax.scan(
        body, jnp.zeros_like(x), (jnp.asarray(a), jnp.asarray(w)), unroll=_unroll(n_chunks)
    )
    attr = total * diff
    f_x = fns.score_pure(state, x, target, score)
    f_b = fns.score_pure(state, baseline, target, score)
    return attr, jnp.sum(attr, axis=(1, 2, 3)), f_x - f_b


def integrated_gradients_adaptive(
    fns: ModelFunctions,
    x,
    target,
    score="logit",
    *,
    target_gap: float = 0.05,
    start_steps: int = 64,
    max_steps: int = 1024,
    rule: str = "pair",
    **kwargs,
):
    """IG whose step count doubles from `start_steps` until every image's completeness gap is
    at most `target_gap` (or `max_steps` is reached; info['converged'] says which)."""
    steps = int(start_steps)
    while True:
        attr, info = integrated_gradients(fns, x, target, score, steps=steps, rule=rule, **kwargs)
        ok = bool(jnp.all(info["gap"] <= target_gap))
        if ok or steps * 2 > max_steps:
            info["converged"] = ok
            return attr, info
        steps *= 2


def blur_ig(
    fns: ModelFunctions,
    x,
    target,
    score="logit",
    *,
    max_sigma: float = 50.0,
    steps: int = 100,
    grad_step: float = 0.01,
    sqrt: bool = False,
    batch_size: int = 32,
    state=None,
):
    """Blur IG [B,H,W,C]: IG along the path of ever stronger Gaussian blurs (PAIR's `BlurIG`
    conventions: sigmas `i * max_sigma / steps`, zero-padded blur, finite-difference
    derivative of the blur with `grad_step`)."""
    x = jnp.asarray(x, jnp.float32)
    _, h, w, _ = x.shape
    if sqrt:
        sigmas = [np.sqrt(i * max_sigma / steps) for i in range(steps + 1)]
    else:
        sigmas = [i * max_sigma / steps for i in range(steps + 1)]
    dsig = np.diff(sigmas).astype(np.float32)
    key = ("blur_ig", score, h, w, float(max_sigma), int(steps), float(grad_step), sqrt)
    mats = fns.cached(
        key + ("matrices",),
        lambda: tuple(jnp.asarray(m) for m in _blur_ig_matrices(h, w, sigmas[:-1], grad_step)),
    )
    fn = fns.cached(
        key + (int(batch_size),),
        lambda: jax.jit(
            functools.partial(_blur_ig_pure, fns, score=score, batch_size=batch_size, dsig=dsig)
        ),
    )
    return fn(fns.state if state is None else state, x, target, mats)


def _blur_ig_matrices(h, w, sigmas, grad_step):
    """Blur matrices of each step and the finite-difference derivative of the blur, formed in
    float64 (a float32 difference of two blurred images loses about 5 digits)."""

    def stack(n, add):
        return np.stack([imageops.blur_matrix(n, s + add, "constant") for s in sigmas])

    mh, mw, mh2, mw2 = stack(h, 0.0), stack(w, 0.0), stack(h, grad_step), stack(w, grad_step)
    # blur2 - blur = (Mh2 - Mh) X Mw2^T + Mh X (Mw2 - Mw)^T
    dh = (mh2 - mh) / grad_step
    dw = (mw2 - mw) / grad_step
    return tuple(np.asarray(m, np.float32) for m in (mh, mw, mw2, dh, dw))


def _blur_ig_pure(fns, state, x, target, mats, *, score, batch_size, dsig):
    mh, mw, mw2, dh, dw = mats
    b = x.shape[0]
    per_call = max(1, int(batch_size) // b)
    n = len(dsig)
    n_chunks = -(-n // per_call)
    pad = n_chunks * per_call - n
    idx = np.concatenate([np.arange(n), np.zeros(pad, int)]).reshape(n_chunks, per_call)
    wts = np.concatenate([dsig, np.zeros(pad, np.float32)]).reshape(n_chunks, per_call)
    hi = jax.lax.Precision.HIGHEST

    def body(acc, chunk):
        ci, cw = chunk
        blur = jnp.einsum("sih,bhwc,sjw->sbijc", mh[ci], x, mw[ci], precision=hi)
        ggrad = jnp.einsum("sih,bhwc,sjw->sbijc", dh[ci], x, mw2[ci], precision=hi)
        ggrad += jnp.einsum("sih,bhwc,sjw->sbijc", mh[ci], x, dw[ci], precision=hi)
        pts = blur.reshape((per_call * b,) + x.shape[1:])
        g, _ = fns.input_gradients_pure(state, pts, jnp.tile(target, per_call), score)
        g = g.reshape((per_call,) + x.shape)
        return acc + jnp.tensordot(cw, ggrad * g, axes=1), None

    total, _ = jax.lax.scan(
        body, jnp.zeros_like(x), (jnp.asarray(idx), jnp.asarray(wts)), unroll=_unroll(n_chunks)
    )
    return -total


# XLA:CPU ran the model about 2x slower inside a while loop than unrolled (ResNet-18 at 112,
# IG 64 steps in 4 chunks): unroll short loops, keep long ones (adaptive IG) rolled.
MAX_UNROLL = 8


def _unroll(n_chunks: int) -> int | bool:
    return True if n_chunks <= MAX_UNROLL else 1
