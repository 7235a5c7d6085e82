"""A model DIR's classifier as an ONNX graph: uint8 images in, probabilities out.

The graph computes exactly what ``sipak_jax.predictor.Predictor.probabilities`` does:
``softmax(model(normalize(images, spec)) / temperature)``, with the normalisation of the
model's ``preprocessing`` spec (channel order, mean, std) inside and a dynamic batch
dimension. Resizing (the ``pad`` / ``stretch`` policy) stays outside: it is per-image work on
images of any size, done by ``sipak_jax.preprocessing.preprocess_image`` (or its equivalent
in the deployment's language) before the graph runs.

The route (``onnx_model``): the model in eval mode is traced to a jaxpr with a symbolic batch
size, that jaxpr is re-evaluated under ``jax2onnx`` (which lowers each JAX primitive to ONNX
operators), and the result is checked with ``onnx.checker``. Three things make the graph an
ordinary one that every ONNX runtime (CPU, WebAssembly, mobile) runs:

- the model's convolutions are switched back to ``lax.conv_general_dilated`` for the export
  (``plain_convolutions``): the matrix-product formulations of ``sipak_jax.models.conv``
  exist for XLA:CPU's speed and would become slices and matrix products instead of ``Conv``;
- the traced jaxpr is re-evaluated with custom derivative rules and nested jits inlined
  (``inlined``): inference needs neither the scatter-free max-pool gradient
  (``sipak_jax.models.pooling``) nor ``channel_matmul``'s, and jax2onnx never sees nnx
  modules (jax2onnx 0.13.0's rewrite of ``nnx.Conv`` fails on explicit padding);
- an NHWC max pooling (a 4-D window) is computed on a [N*C, H, W] view, which jax2onnx
  lowers to a ``MaxPool`` with 3 spatial dimensions; a 4-D window would become a ``MaxPool``
  with 4, which ONNX Runtime does not run;
- ReLUs and BatchNorms are written in the forms ONNX Runtime fuses into the convolutions
  (``_rewritten``).

``check_against_jax`` runs the graph in ONNX Runtime beside the JAX function it came from.
"""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

OPSET = 21  # ONNX Runtime >= 1.18 (and its Web and Mobile builds) runs it; 17 is too old here
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "batch"
_INLINED = {"custom_vjp_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr", "jit": "jaxpr"}


def plain_convolutions(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` in eval mode whose ``nnx.Conv`` layers compute through
    ``lax.conv_general_dilated`` (same parameters, same results within float rounding)."""
    model = nnx.clone(model)
    model.eval()
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv):
            module.conv_general_dilated = lax.conv_general_dilated
    return model


def probabilities_function(model: nnx.Module, spec: dict, temperature: float, plain=True):
    """uint8 [N, S, S, 3] RGB -> float32 probabilities [N, K]: normalisation, the model (its
    convolutions made plain unless ``plain`` is False), softmax at ``temperature``."""
    from sipak_jax import preprocessing

    net = plain_convolutions(model) if plain else model
    spec, inv_t = dict(spec), 1.0 / float(temperature)

    def probabilities(images):
        logits = net(preprocessing.normalize(images, spec)).astype(jnp.float32)
        return jax.nn.softmax(logits * inv_t, axis=-1)

    return probabilities


def input_struct(image_size: int) -> jax.ShapeDtypeStruct:
    """The graph's input: uint8 [batch, S, S, 3], the batch size symbolic."""
    shape = jax.export.symbolic_shape(f"{BATCH_DIM}, {int(image_size)}, {int(image_size)}, 3")
    return jax.ShapeDtypeStruct(shape, jnp.uint8)


def _max_pool_nhwc(x, params):
    """``reduce_window_max`` over an NHWC window (1, kh, kw, 1), as a 3-D window on [N*C, H,
    W] (see the module docstring)."""
    n, h, w, c = x.shape
    window, strides, pads = (params[k] for k in ("window_dimensions", "window_strides", "padding"))
    y = jnp.transpose(x, (0, 3, 1, 2)).reshape(-1, h, w)
    y = lax.reduce_window(
        y, -jnp.inf, lax.max, (1, *window[1:3]), (1, *strides[1:3]), ((0, 0), *pads[1:3])
    )
    return jnp.transpose(y.reshape(n, c, *y.shape[1:]), (0, 2, 3, 1))


def _is_nhwc_pool(eqn) -> bool:
    if eqn.primitive.name != "reduce_window_max":
        return False
    p = eqn.params
    return (
        len(p["window_dimensions"]) == 4
        and p["window_dimensions"][0] == p["window_dimensions"][3] == 1
        and p["window_strides"][0] == p["window_strides"][3] == 1
        and tuple(p["padding"][0]) == tuple(p["padding"][3]) == (0, 0)
        and set(p["base_dilation"]) | set(p["window_dilation"]) == {1}
    )


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _zero(x) -> bool:
    return not _traced(x) and bool(np.all(np.asarray(x) == 0))


def _rewritten(eqn, invals):
    """The outputs of ``eqn`` in the form ONNX runtimes optimise, or None to bind it as it is.

    Values computed from constants alone are concrete here (``_bind``: only what depends on
    the images is traced), so they reach the graph as initialisers. ``max(x, 0)`` becomes
    ``jax.nn.relu`` (jax2onnx: ``Relu``, which ONNX Runtime fuses into the ``Conv`` before
    it); ``x - c`` with a constant ``c`` becomes ``x + (-c)``, so that a BatchNorm after a
    convolution is Add, Mul, Add, which ONNX Runtime can fold into the convolution."""
    name = eqn.primitive.name
    if _is_nhwc_pool(eqn):
        return [_max_pool_nhwc(invals[0], eqn.params)]
    if name == "max" and _traced(invals[0]) and _zero(invals[1]):
        return [jax.nn.relu(invals[0])]
    if name == "max" and _zero(invals[0]) and _traced(invals[1]):
        return [jax.nn.relu(invals[1])]
    if name == "sub" and _traced(invals[0]) and not _traced(invals[1]):
        with jax.ensure_compile_time_eval():
            negated = lax.neg(invals[1])
        return [lax.add(invals[0], negated)]
    return None


def _bind(eqn, invals):
    """``eqn`` applied to ``invals``; computed now (not staged into the graph) when no input
    depends on the images and no output has the symbolic batch size."""
    shapes = [getattr(v.aval, "shape", ()) for v in eqn.outvars]
    symbolic = any(not isinstance(d, (int, np.integer)) for shape in shapes for d in shape)
    if symbolic or any(_traced(x) for x in invals):
        outs = eqn.primitive.bind(*invals, **eqn.params)
    else:
        with jax.ensure_compile_time_eval():
            outs = eqn.primitive.bind(*invals, **eqn.params)
    return outs if eqn.primitive.multiple_results else [outs]


def _evaluate(jaxpr, consts, args):
    """``jax.core.eval_jaxpr`` with ``_INLINED`` primitives evaluated from their bodies and
    some equations ``_rewritten``."""
    from jax.extend import core as jcore

    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        body = _INLINED.get(eqn.primitive.name)
        if body is not None:
            inner = eqn.params[body]
            outs = _evaluate(inner.jaxpr, inner.consts, invals)
        else:
            outs = _rewritten(eqn, invals)
        if outs is None:
            outs = _bind(eqn, invals)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def inlined(fn, struct: jax.ShapeDtypeStruct):
    """``fn`` traced once for ``struct``, as a function of ordinary JAX primitives only."""
    closed = jax.make_jaxpr(fn)(struct)

    def plain(x):
        (out,) = _evaluate(closed.jaxpr, closed.consts, [x])
        return out

    return plain


def onnx_model(model: nnx.Module, spec: dict, temperature: float, *, quiet: bool = True):
    """The ONNX ``ModelProto`` of ``probabilities_function(model, spec, temperature)``:
    input ``images`` uint8 [batch, S, S, 3], output ``probabilities`` float32 [batch, K].
    ``quiet``: hide jax2onnx's warnings (its errors still show)."""
    import onnx
    from jax2onnx import to_onnx

    struct = input_struct(int(spec["image_size"]))
    plain = inlined(probabilities_function(model, spec, temperature), struct)
    with _quiet_loggers(("jax2onnx", "onnx_ir"), quiet):
        proto = to_onnx(
            plain,
            [struct],
            model_name="sipak_jax",
            opset=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
    onnx.checker.check_model(proto)
    return proto


@contextlib.contextmanager
def _quiet_loggers(names, quiet: bool):
    """The loggers ``names`` raised to ERROR inside the block when ``quiet`` (jax2onnx logs a
    warning with a traceback for each optional plugin whose library it cannot use, onnx_ir
    one for each constant shape it serialises without a type)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    if quiet:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_against_jax(proto, fn, image_size: int, batch_size: int = 2, seed: int = 0) -> float:
    """Max |ONNX Runtime - JAX| of the probabilities on ``batch_size`` random uint8 images."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    want = np.asarray(jax.jit(fn)(images))
    return float(np.max(np.abs(got - want)))
