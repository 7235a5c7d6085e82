"""2-D convolutions written in the form XLA:CPU runs fast for their static shape.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` that ``nnx.Conv``
takes as its ``conv_general_dilated`` argument: the module, its parameters and their tree
paths stay those of ``nnx.Conv``; only the arithmetic that computes the same result changes.
It picks, from the static shapes (``formulation``):

- ``"pointwise"``: a 1x1 kernel without padding is a matrix product over channels (of
  ``x[:, ::s, ::s]`` when strided).
- ``"patches"``: small output maps (at most ``PATCHES_MAX_OUTPUT_POSITIONS`` positions). The
  padded input's shifted (strided) windows, one per kernel tap, are concatenated along
  channels and multiplied by the kernel reshaped to [taps * in, out]: one matrix product.
  Taps that only ever read padding are dropped (on a 1x1 map only the centre tap of a 3x3
  kernel is left). XLA:CPU computes 3x3 convolutions on 2x2 maps (ResNet's last stage at
  64 px), and the input gradient of stride-2 convolutions onto them, 25-150x slower than
  oneDNN does; as matrix products the whole ResNet-18 step at 64 px ran about 9x faster.
- ``"depthwise"`` (``depthwise_conv``): a depthwise convolution (one group per channel,
  stride 1, ConvNeXt's 7x7) as the sum of the kernel's shifted windows times its taps, with a
  hand-written backward pass. XLA:CPU's grouped convolution ran ConvNeXt-T's 7x7 depthwise
  layers 25-75x slower forward and 3-6x slower forward+backward (batch 8, 56x56x96 to
  7x7x768, 2-core CPU) than this form, which is elementwise work XLA fuses.
- ``"xla"``: everything else (larger maps, dilations, other groups, other layouts), unchanged.

Both matrix-product forms go through ``channel_matmul``, whose backward pass picks the
orientation of the kernel-gradient product (see there). Inputs are NHWC and kernels HWIO
(``nnx.Conv``'s layout); results equal ``lax.conv_general_dilated`` within float rounding
(another summation order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# A convolution goes through patches when its output map has at most this many positions
# (2x2 = 4). Measured on a ResNet-18 step at 64 px (2-core CPU): 4 beat 16 and 64 by 15-20%.
PATCHES_MAX_OUTPUT_POSITIONS = 4

_NHWC = ("NHWC", "HWIO", "NHWC")


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    """Output length of one spatial dimension (no dilation)."""
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def live_taps(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> list[int]:
    """Kernel offsets along one dimension that read at least one real (unpadded) input."""
    n_out = output_size(size, kernel, stride, pad)
    return [
        k
        for k in range(kernel)
        if any(pad[0] <= k + stride * o < pad[0] + size for o in range(n_out))
    ]


def formulation(in_hw, kernel_hw, strides, pads) -> str:
    """``"pointwise"``, ``"patches"`` or ``"xla"`` for an NHWC/HWIO convolution without
    dilation or groups (see the module docstring)."""
    if tuple(kernel_hw) == (1, 1) and all(tuple(p) == (0, 0) for p in pads):
        return "pointwise"
    out = [output_size(*args) for args in zip(in_hw, kernel_hw, strides, pads, strict=True)]
    if min(out) < 1:
        return "xla"  # let lax report the empty or impossible shape
    if out[0] * out[1] <= PATCHES_MAX_OUTPUT_POSITIONS:
        return "patches"
    return "xla"


def channel_matmul(x, kernel, precision=None):
    """``x [..., in] @ kernel [in, out]``, the product both matrix-product forms end in.

    Same value and gradients as ``lax.dot_general``; the backward pass is written out so
    that the kernel gradient (a product over every leading axis, for which XLA:CPU first
    transposes one operand, fused into the computation that produces it) transposes the
    operand with fewer channels: ``x`` when ``in <= out``, else the output cotangent. With
    autodiff's choice a ResNet-50 step at 224 px spent a quarter of its time in such
    transposes of 256-2048 channel tensors; this made the step about 1.2x faster.
    """
    return _channel_matmul(precision)(x, kernel)


@functools.cache
def _channel_matmul(precision):
    def value(x, kernel):
        return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)

    @jax.custom_vjp
    def apply(x, kernel):
        return value(x, kernel)

    def forward(x, kernel):
        return value(x, kernel), (x, kernel)

    def backward(saved, g):
        x, kernel = saved
        last = x.ndim - 1
        lead = tuple(range(last))
        dx = lax.dot_general(g, kernel, (((last,), (1,)), ((), ())), precision=precision)
        if x.shape[-1] <= g.shape[-1]:
            dk = lax.dot_general(x, g, ((lead, lead), ((), ())), precision=precision)
        else:
            dk = lax.dot_general(g, x, ((lead, lead), ((), ())), precision=precision).T
        return dx.astype(x.dtype), dk.astype(kernel.dtype)

    apply.defvjp(forward, backward)
    return apply


def _matmul(x, kernel, precision, preferred_element_type):
    if preferred_element_type is None:
        return channel_matmul(x, kernel, precision)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return lax.dot_general(x, kernel, dims, precision, preferred_element_type)


def conv_pointwise(x, kernel, strides, *, precision=None, preferred_element_type=None):
    """A 1x1 NHWC/HWIO convolution without padding as one matrix product."""
    sh, sw = strides
    if sh > 1 or sw > 1:
        x = x[:, ::sh, ::sw, :]
    return _matmul(x, kernel[0, 0], precision, preferred_element_type)


def conv_patches(x, kernel, strides, pads, *, precision=None, preferred_element_type=None):
    """An NHWC/HWIO convolution as (shifted windows of the padded input) x (kernel): one
    matrix product over [taps * in] channels; taps that only read padding are left out."""
    n, h, w, c = x.shape
    kh, kw, _, cout = kernel.shape
    (sh, sw), (ph, pw) = strides, pads
    ho, wo = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    rows, cols = live_taps(h, kh, sh, ph), live_taps(w, kw, sw, pw)
    if any(p != 0 for p in (*ph, *pw)):
        x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    windows = [
        lax.slice(
            x, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1)
        )
        for i in rows
        for j in cols
    ]
    if len(rows) == kh and len(cols) == kw:
        taps = kernel.reshape(kh * kw * c, cout)
    else:
        taps = jnp.concatenate([kernel[i, j] for i in rows for j in cols], axis=0)
    patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    return _matmul(patches, taps, precision, preferred_element_type)


def _depthwise_taps(x, taps, pads):
    """sum over taps (i, j) of the padded ``x``'s window at (i, j) times ``taps[i, j]`` [C]:
    a stride-1 depthwise convolution of NHWC ``x`` with ``taps`` [kh, kw, C]."""
    (pt, pb), (pl, pr) = pads
    kh, kw, _ = taps.shape
    n, h, w, c = x.shape
    ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            term = lax.slice(xp, (0, i, j, 0), (n, i + ho, j + wo, c)) * taps[i, j]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x, kernel, pads):
    """A stride-1 depthwise NHWC convolution, ``kernel`` [kh, kw, 1, C] (``nnx.Conv``'s layout
    with ``feature_group_count=C``), padding ``pads`` ((top, bottom), (left, right))."""
    return _depthwise_taps(x, kernel[:, :, 0, :], pads)


def _depthwise_fwd(x, kernel, pads):
    return depthwise_conv(x, kernel, pads), (x, kernel)


def _depthwise_bwd(pads, saved, g):
    """Input gradient: the same sum with the flipped kernel over the output gradient padded
    by (k - 1 - pad); kernel gradient: per tap, the window of the padded input times the
    output gradient, summed over batch and positions."""
    x, kernel = saved
    kh, kw = kernel.shape[:2]
    (pt, pb), (pl, pr) = pads
    back = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
    dx = _depthwise_taps(g, kernel[::-1, ::-1, 0, :].astype(g.dtype), back)
    n, ho, wo, c = g.shape
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    dk = jnp.stack(
        [
            jnp.sum(lax.slice(xp, (0, i, j, 0), (n, i + ho, j + wo, c)) * g, axis=(0, 1, 2))
            for i in range(kh)
            for j in range(kw)
        ]
    )
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def _is_depthwise(
    lhs, rhs, strides, pads, lhs_dilation, rhs_dilation, dimension_numbers, groups, batch_groups
) -> bool:
    """Whether this call is a stride-1 depthwise NHWC/HWIO convolution ``depthwise_conv``
    computes (every pad smaller than the kernel, so the backward padding is not negative)."""
    if lhs.ndim != 4 or groups == 1 or not (groups == lhs.shape[-1] == rhs.shape[-1]):
        return False
    if rhs.shape[2] != 1 or batch_groups != 1 or tuple(strides) != (1, 1):
        return False
    if isinstance(pads, str) or len(pads) != 2:
        return False
    kernel_hw = rhs.shape[:2]
    if any(not 0 <= p < kernel_hw[d] for d in range(2) for p in pads[d]):
        return False
    return _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, 1, 1)


def _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, groups, batch_groups):
    """Whether this call is an NHWC/HWIO 2-D convolution without dilation or groups."""
    if lhs.ndim != 4 or groups != 1 or batch_groups != 1 or dimension_numbers is None:
        return False
    if any(d not in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return False
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with the formulation chosen by ``formulation`` (and
    depthwise convolutions through ``depthwise_conv``)."""
    depthwise = (
        out_sharding is None
        and preferred_element_type is None
        and _is_depthwise(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count,
        )
    )  # fmt: skip
    if depthwise:
        return depthwise_conv(lhs, rhs, tuple(tuple(int(v) for v in p) for p in padding))
    plain = out_sharding is None and _plain_nhwc(
        lhs,
        rhs,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
    )
    if plain:
        strides = tuple(window_strides)
        pads = padding
        if isinstance(padding, str):
            pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
        pads = tuple(tuple(p) for p in pads)
        kind = formulation(lhs.shape[1:3], rhs.shape[:2], strides, pads)
        kwargs = {"precision": precision, "preferred_element_type": preferred_element_type}
        if kind == "pointwise":
            return conv_pointwise(lhs, rhs, strides, **kwargs)
        if kind == "patches":
            return conv_patches(lhs, rhs, strides, pads, **kwargs)
    kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )
