"""Benchmark: ResNet-50 train-step and inference images/s, Flax (ours) beside PyTorch.

The same network (torchvision ``resnet50``, channels_last, and our ``ResNet(50, 1000,
variant="v1.5")``), batch and resolution, measured in one process, alternating: for each
setting, ``--repeats`` rounds of ``--steps`` steps of ours then ``--steps`` of PyTorch, after
a warm-up; the median of each side and their ratio are printed (ratio > 1: ours is faster).
Compilation is timed apart. Training = forward + backward + SGD-momentum update (BatchNorm in
training mode, state buffers donated); inference = eval-mode forward.

    python benchmarks/model.py [--quick] [--batch_sizes=16,64] [--dtypes=float32,bfloat16]
        [--modes=train,infer] [--size=224] [--steps=3] [--repeats=5] [--threads=N]
        [--xla_flags="--xla_cpu_use_onednn=true"] [--no_torch]

``--quick``: batch 16, float32, 2 steps x 3 repeats (flags given explicitly still win).
``--xla_flags`` is appended to ``XLA_FLAGS`` before JAX starts. bfloat16 runs JAX with
``dtype=jnp.bfloat16`` (float32 parameters) and PyTorch under
``torch.autocast("cpu", dtype=torch.bfloat16)``.
On a shared machine absolute figures drift; the ratios of one run are what to compare.
Arithmetic: ResNet-50 at 224 costs 4.09 GMAC forward (~8.2 GFLOP), ~24.5 GFLOP per trained
image; the printed GFLOP/s scale that to the resolution used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FWD_GFLOP_224 = 8.18  # ResNet-50 forward at 224x224 (2 x 4.09 GMAC)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch_sizes", default=None, help="default 16,64 (--quick: 16)")
    p.add_argument("--dtypes", default=None, help="default float32,bfloat16 (--quick: float32)")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=None, help="default 3 (--quick: 2)")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (--quick: 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--xla_flags", default="")
    p.add_argument("--no_torch", action="store_true")
    a = p.parse_args()
    defaults = (
        {"batch_sizes": "16", "dtypes": "float32", "steps": 2, "repeats": 3}
        if a.quick
        else {"batch_sizes": "16,64", "dtypes": "float32,bfloat16", "steps": 3, "repeats": 5}
    )
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


ARGS = _parse()
if ARGS.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from sipak_jax.models import ResNet  # noqa: E402


def flax_steps(batch, dtype, mode):
    """(compile seconds, run(n) -> seconds for n steps)."""
    model = ResNet(50, 1000, dtype=dtype, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, ARGS.size, ARGS.size, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
    if mode == "infer":
        model.eval()
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        t = time.perf_counter()
        jax.block_until_ready(fwd(state, x))
        compile_s = time.perf_counter() - t

        def run(n):
            t = time.perf_counter()
            for _ in range(n):
                out = fwd(state, x)
            jax.block_until_ready(out)
            return time.perf_counter() - t

        return compile_s, run

    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    def step(params, rest, opt_state, x, y):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            logits = m(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, nnx.state(m, ...)

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # keep only the non-parameter part (BatchNorm statistics) of the new state
        new_rest = nnx.split_state(new_rest, nnx.Param, ...)[1]
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    state = [params, rest, opt_state]
    t = time.perf_counter()
    out = step(*state, x, y)
    jax.block_until_ready(out)
    state = list(out[:3])
    compile_s = time.perf_counter() - t

    def run(n):
        t = time.perf_counter()
        for _ in range(n):
            out = step(*state, x, y)
            state[:] = out[:3]
        jax.block_until_ready(out)
        return time.perf_counter() - t

    return compile_s, run


def torch_steps(batch, dtype, mode):
    import torch
    import torchvision

    torch.set_num_threads(ARGS.threads)
    model = torchvision.models.resnet50().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, ARGS.size, ARGS.size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if mode == "infer":
        model.eval()

        def one():
            with torch.inference_mode(), autocast():
                model(x)

    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def one():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    t = time.perf_counter()
    one()
    warm = time.perf_counter() - t

    def run(n):
        t = time.perf_counter()
        for _ in range(n):
            one()
        return time.perf_counter() - t

    return warm, run


def main():
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, size {ARGS.size}, "
        f"{ARGS.steps} steps x {ARGS.repeats} repeats, median"
    )
    scale = (ARGS.size / 224) ** 2
    rows = []
    for mode in ARGS.modes.split(","):
        gflop = FWD_GFLOP_224 * scale * (3 if mode == "train" else 1)
        for dtype_name in ARGS.dtypes.split(","):
            dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
            for batch in map(int, ARGS.batch_sizes.split(",")):
                compile_s, ours = flax_steps(batch, dtype, mode)
                theirs = None
                if not ARGS.no_torch:
                    _, theirs = torch_steps(batch, dtype_name, mode)
                    theirs(1)  # second warm-up step (allocator, oneDNN primitive cache)
                ours(1)
                a, b = [], []
                for _ in range(ARGS.repeats):
                    a.append(batch * ARGS.steps / ours(ARGS.steps))
                    if theirs:
                        b.append(batch * ARGS.steps / theirs(ARGS.steps))
                ips = statistics.median(a)
                ref = statistics.median(b) if b else float("nan")
                row = (
                    f"{mode:5s} {dtype_name:8s} batch {batch:3d}: flax {ips:7.2f} img/s "
                    f"({1000 * batch / ips:7.0f} ms/step, {ips * gflop:6.1f} GFLOP/s, compile "
                    f"{compile_s:5.1f} s) | torch {ref:7.2f} img/s | ratio {ips / ref:5.2f}x"
                )
                print(row, flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
