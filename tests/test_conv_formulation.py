"""The convolution formulations of `sipak_jax.models.conv`, the scatter-free max pooling of
`sipak_jax.models.pooling` and the XLA:CPU flag of `sipak_jax.models.xla_cpu`: each equal
to the plain lax computation (values and gradients) within float rounding."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from sipak_jax.models import ResNet, conv, pooling, resnet, xla_cpu

NHWC = ("NHWC", "HWIO", "NHWC")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (height, width, kernel, stride, pad): SAME-like padding, stride 2, odd and even sizes, maps
# smaller than the kernel, and the 7x7 stem.
CASES = [
    (1, 1, 3, 1, 1),
    (2, 2, 3, 1, 1),
    (3, 3, 3, 1, 1),
    (2, 3, 3, 1, 1),
    (4, 4, 3, 2, 1),
    (3, 3, 3, 2, 1),
    (5, 4, 3, 2, 1),
    (2, 2, 3, 2, 1),
    (8, 8, 3, 1, 1),
    (7, 7, 3, 2, 1),
    (9, 8, 7, 2, 3),
    (4, 4, 3, 1, 0),
]


def _inputs(h, w, k, cin=5, cout=6, seed=0):
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (2, h, w, cin))
    kernel = jax.random.normal(kk, (k, k, cin, cout)) / np.sqrt(k * k * cin)
    return x, kernel


def _ref(x, kernel, s, p):
    return lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=NHWC)


def _loss(conv_fn):
    # A non-linear loss: the cotangent reaching the convolution differs per position.
    return lambda x, kernel: jnp.sum(jnp.sin(conv_fn(x, kernel)).astype(jnp.float32))


def _assert_close(actual, desired, tol):
    actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    assert actual.shape == desired.shape
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * scale)


def _check(conv_fn, x, kernel, s, p, dtype=jnp.float32):
    """conv_fn against lax in float32 (inputs rounded to `dtype` first): value, d/dx, d/dk."""
    xr, kr = x.astype(dtype).astype(jnp.float32), kernel.astype(dtype).astype(jnp.float32)
    ref = lambda x, k: _ref(x, k, s, p)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    out = conv_fn(x.astype(dtype), kernel.astype(dtype))
    assert out.dtype == dtype
    _assert_close(out, ref(xr, kr), tol)
    grads = jax.grad(_loss(conv_fn), argnums=(0, 1))(x.astype(dtype), kernel.astype(dtype))
    ref_grads = jax.grad(_loss(ref), argnums=(0, 1))(xr, kr)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        _assert_close(g, r, tol if dtype == jnp.float32 else 6e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h, w, k, s, p", CASES)
def test_patches_equal_lax(h, w, k, s, p, dtype):
    x, kernel = _inputs(h, w, k)
    fn = lambda x, kernel: conv.conv_patches(x, kernel, (s, s), ((p, p), (p, p)))
    _check(jax.jit(fn), x, kernel, s, p, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h, w, s", [(7, 9, 1), (7, 9, 2), (4, 4, 2), (1, 1, 1)])
@pytest.mark.parametrize("cin, cout", [(3, 8), (8, 3)])  # both kernel-gradient orientations
def test_pointwise_equals_lax(h, w, s, cin, cout, dtype):
    x, kernel = _inputs(h, w, 1, cin, cout)
    fn = lambda x, kernel: conv.conv_pointwise(x, kernel, (s, s))
    _check(jax.jit(fn), x, kernel, s, 0, dtype)


@pytest.mark.parametrize("h, w, k, s, p", CASES + [(16, 16, 3, 1, 1), (1, 1, 1, 1, 0)])
def test_dispatch_equals_lax_whatever_it_picks(h, w, k, s, p):
    x, kernel = _inputs(h, w, k)

    def fn(x, kernel):
        return conv.conv_general_dilated(
            x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=NHWC
        )

    _check(jax.jit(fn), x, kernel, s, p)


def test_dispatch_picks_by_output_size():
    pad1 = ((1, 1), (1, 1))
    assert conv.formulation((2, 2), (3, 3), (1, 1), pad1) == "patches"
    assert conv.formulation((4, 4), (3, 3), (2, 2), pad1) == "patches"  # 2x2 output
    assert conv.formulation((1, 1), (3, 3), (1, 1), pad1) == "patches"
    assert conv.formulation((4, 4), (3, 3), (1, 1), pad1) == "xla"
    assert conv.formulation((56, 56), (3, 3), (1, 1), pad1) == "xla"
    assert conv.formulation((56, 56), (1, 1), (2, 2), ((0, 0), (0, 0))) == "pointwise"
    assert conv.formulation((5, 5), (1, 1), (1, 1), pad1) != "pointwise"  # padded 1x1


def test_taps_that_only_read_padding_are_dropped():
    assert conv.live_taps(1, 3, 1, (1, 1)) == [1]  # a 1x1 map: the centre tap only
    assert conv.live_taps(2, 3, 1, (1, 1)) == [0, 1, 2]
    assert conv.live_taps(2, 3, 2, (1, 1)) == [1, 2]  # one output row, reading rows -1..1
    assert conv.live_taps(56, 3, 1, (1, 1)) == [0, 1, 2]


def test_string_padding_and_other_layouts_go_through_lax_unchanged():
    x, kernel = _inputs(6, 6, 3)
    same = conv.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
    _assert_close(same, _ref(x, kernel, 1, 1), 1e-5)
    dilated = conv.conv_general_dilated(
        x, kernel, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC
    )
    want = lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC
    )
    _assert_close(dilated, want, 1e-6)
    nchw = jnp.transpose(x, (0, 3, 1, 2))
    dn = ("NCHW", "HWIO", "NCHW")
    got = conv.conv_general_dilated(nchw, kernel, (1, 1), "SAME", dimension_numbers=dn)
    _assert_close(
        got, lax.conv_general_dilated(nchw, kernel, (1, 1), "SAME", dimension_numbers=dn), 1e-6
    )


def _reduce_window_max_pool(x):
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 4), (1, 1, 1, 2), (1, 2, 3, 2)])
def test_max_pool_equals_reduce_window_with_ties(shape, dtype):
    """Values and gradients against JAX's own (select_and_scatter) gradient, on inputs full
    of ties (rounded ReLU outputs): the gradient goes to the first maximum of each window."""
    x = jax.random.normal(jax.random.key(1), shape)
    tied = jnp.round(jax.nn.relu(x) * 2) / 2
    for inp in (x.astype(dtype), tied.astype(dtype)):
        y = pooling.max_pool(inp)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(_reduce_window_max_pool(inp)))
        g = jax.random.normal(jax.random.key(2), y.shape).astype(dtype)
        ours = jax.vjp(pooling.max_pool, inp)[1](g)[0]
        want = jax.vjp(_reduce_window_max_pool, inp)[1](g)[0]
        assert ours.dtype == dtype
        # overlapping windows add up in another order: one bfloat16 rounding apart at most
        tol = 1e-6 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(
            np.asarray(ours, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
        )


def _plain_lax_model(monkeypatch):
    """Makes models traced from now on use lax for every convolution and reduce_window max
    pooling (the computation before these rewrites)."""
    monkeypatch.setattr(conv, "formulation", lambda *args: "xla")
    monkeypatch.setattr(resnet, "_max_pool_3x3_s2", _reduce_window_max_pool)


@pytest.mark.parametrize("depth, size", [(18, 32), (50, 64)])
def test_whole_model_equals_plain_lax_in_training(depth, size, monkeypatch):
    """A training-mode ResNet whose last stages run on 1x1 and 2x2 maps (patches), 1x1
    convolutions (matrix products) and max pooling: logits and every parameter gradient
    equal those of the same model computed with lax alone."""
    model = ResNet(depth, 5, width=8, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(3), (4, size, size, 3))
    y = jnp.arange(4) % 5

    def loss(params):
        logits = nnx.merge(graphdef, params, rest, copy=True)(x)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    picked = []
    formulation = conv.formulation
    monkeypatch.setattr(
        conv, "formulation", lambda *a: picked.append(formulation(*a)) or picked[-1]
    )
    (l1, logits1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert set(picked) == {"pointwise", "patches", "xla"}  # the model really takes each path
    _plain_lax_model(monkeypatch)
    (l2, logits2), g2 = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    _assert_close(logits1, logits2, 1e-4)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        _assert_close(a, b, 2e-4)


def test_parameters_keep_their_paths_and_shapes():
    """The rewrites live in how nnx.Conv computes, not in the modules: same tree as ever."""
    model = ResNet(18, 5, width=8, rngs=nnx.Rngs(0))
    assert (
        type(model.layer4[0].conv1) is nnx.Conv
        and type(model.layer4[0].downsample_conv) is nnx.Conv
    )
    assert model.layer4[0].conv1.kernel[...].shape == (3, 3, 32, 64)
    assert model.layer4[0].downsample_conv.kernel[...].shape == (1, 1, 32, 64)


def test_flag_respects_a_users_own_setting(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+eltwise")
    assert xla_cpu.prefer_eigen_convolutions() is False
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=+eltwise"


def test_flag_is_not_added_once_xla_has_started(monkeypatch):
    jnp.zeros(1).block_until_ready()  # this process's CPU client has started
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_cpu.prefer_eigen_convolutions() is False
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_flag_is_added_before_xla_starts_and_only_on_checked_versions(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_cpu.prefer_eigen_convolutions() is True
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2",
        xla_cpu.EIGEN_CONVOLUTIONS_FLAG,
    ]
    assert xla_cpu.prefer_eigen_convolutions() is True  # idempotent
    assert os.environ["XLA_FLAGS"].count(xla_cpu.EIGEN_CONVOLUTIONS_FLAG) == 1
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_cpu, "CHECKED_JAXLIB_VERSIONS", ("0.0.1",))
    assert xla_cpu.prefer_eigen_convolutions() is False
    assert os.environ["XLA_FLAGS"] == ""


_PROBE = """
import jax, jax.numpy as jnp
from jax import lax
import sipak_jax.models  # noqa: F401  (before any computation)
f = jax.jit(jax.grad(lambda w, x: lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()))
text = f.lower(jnp.ones((3, 3, 32, 32)), jnp.ones((4, 16, 16, 32))).compile().as_text()
print("convolutions in YNNPACK" if "__ynn_fusion" in text else "convolutions in XLA")
"""


def test_importing_the_models_takes_convolutions_away_from_ynnpack():
    """In a fresh process (the flag acts when XLA starts): the compiled convolution and its
    gradients are XLA's own, not YNNPACK fusions; without the import they would be."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "convolutions in XLA"
    plain = _PROBE.replace("import sipak_jax.models", "import sipak_jax")
    out = subprocess.run(
        [sys.executable, "-c", plain], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.strip().splitlines()[-1] != "convolutions in YNNPACK":
        # The control: XLA:CPU did not pick YNNPACK by itself in this environment (seen once
        # on a heavily loaded machine), so the flag cannot be shown to matter here.
        pytest.skip("XLA:CPU used its own convolutions even without the flag")
