"""Benchmark: training step / inference of a backbone, Flax (ours) beside torchvision or timm,
as a time ratio.

The same network (``--arch``: ``resnet18/34/50`` (default ``resnet{--depth}``),
``convnext_tiny``, or any name a ``sipak_jax.conversions`` family converts; ours built by
``sipak_jax.models.registry`` with 1000 classes, the reference by torchvision or timm
(``--references``), channels_last), batch, resolution and optimizer (AdamW), measured
alternating (PyTorch in a child process, ``torch_reference.py``; never both at once): after a
warm-up, ``--repeats`` rounds of ``--steps`` steps of each contender in turn; the median
milliseconds per step of each and the ratio ours / PyTorch are printed (time ratio: 1.0 = as
fast, 1.5 = half as fast again as PyTorch; lower is better). Compilation is timed apart. Training =
forward + backward + AdamW update (BatchNorm in training mode, state buffers donated);
inference = eval-mode forward.

    python benchmarks/model.py [--depth=18 | --arch=convnext_tiny] [--references=torchvision,timm]
        [--image_size=64] [--batch_sizes=32]
        [--dtypes=float32] [--modes=train] [--steps=3] [--repeats=5]
        [--torch_threads=2,1] [--conv=auto,xla] [--xla_flags="--xla_cpu_use_onednn=true"]
        [--no_torch]

``--conv``: the convolution formulations of ours to measure side by side: ``auto`` (what the
model uses: ``sipak_jax.models.conv`` picks matrix products for small maps) and/or ``xla``
(every convolution but the 1x1 ones through ``lax.conv_general_dilated``).
``--torch_threads``: PyTorch is measured once per thread count given (``torch/2t``, ...);
the ratio is taken against the fastest. On a loaded machine OpenMP with 2 threads can be
several times slower than with 1 (its threads wait for each other at every barrier), which
would flatter ours: give ``--torch_threads=2,1`` there, or pin the whole run to one core
(``taskset -c 1 ... --torch_threads=1``) to compare single-core speed.
``--xla_flags`` is appended to ``XLA_FLAGS`` before JAX starts (importing
``sipak_jax.models`` adds ``xla_cpu.EIGEN_CONVOLUTIONS_FLAG``; the header shows the result).
bfloat16 runs JAX with ``dtype=jnp.bfloat16`` (float32 parameters) and PyTorch under
``torch.autocast("cpu", dtype=torch.bfloat16)``.
On a shared machine absolute figures drift; the ratios of one run are what to compare; the
load average is printed before and after. The header gives our parameter count and XLA's own
cost analysis (``compiled.cost_analysis()["flops"]``) of the inference forward and of the
training step per image, at the measured resolution: the GFLOP/s column divides those.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Forward GFLOP at 224x224 (2 x GMAC), published; the GFLOP/s column uses XLA's own count.
FWD_GFLOP_224 = {18: 3.64, 34: 7.34, 50: 8.18}
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 1e-4  # torch_reference.py uses the same
CHILDREN: list[subprocess.Popen] = []  # PyTorch reference processes, closed after measuring


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=50, choices=sorted(FWD_GFLOP_224))
    p.add_argument(
        "--arch", default="", help="resnet50, convnext_tiny, ... (default resnet{depth})"
    )
    p.add_argument("--references", default="torchvision", help="comma-separated: torchvision, timm")
    p.add_argument("--image_size", "--size", type=int, default=224)
    p.add_argument("--batch_sizes", default="32")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch_threads", default=str(os.cpu_count()), help="comma-separated")
    p.add_argument("--conv", default="auto", help="comma-separated: auto, xla")
    p.add_argument("--xla_flags", default="")
    p.add_argument("--no_torch", action="store_true")
    a = p.parse_args()
    for c in a.conv.split(","):
        if c not in ("auto", "xla"):
            p.error(f"--conv: unknown formulation {c!r} (auto, xla)")
    return a


ARGS = _parse()
if ARGS.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from sipak_jax.models import registry  # noqa: E402

ARCH = ARGS.arch or f"resnet{ARGS.depth}"
FLOPS: dict[str, float] = {}  # XLA's cost analysis per image: "infer", "train"


def model_config(arch: str) -> dict:
    """Our model config for a reference library's model name (1000 classes)."""
    if arch.startswith("resnet") and arch[len("resnet") :].isdigit():
        return {"depth": int(arch[len("resnet") :]), "variant": "v1.5", "num_classes": 1000,
                "width": 64}  # fmt: skip
    from sipak_jax import conversions

    for source in ("torchvision", "timm"):
        module = conversions.find(source, arch)
        if module is not None:
            return dict(module.ARCHS[(source, arch)])
    raise SystemExit(f"error: --arch={arch} is not a ResNet nor in sipak_jax.conversions")


def build_model(dtype):
    # Initialised under jit: eager initialisation of a large model is slow on a CPU.
    return nnx.jit(lambda: registry.create(model_config(ARCH), dtype=dtype))()


def _count_flops(kind, jitted, batch, *args):
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    FLOPS[kind] = float(cost.get("flops", float("nan"))) / batch


def _inputs(batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, ARGS.image_size, ARGS.image_size, 3)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))


def _timed(fn, *args):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def flax_infer(batch, dtype):
    model = build_model(dtype)
    x, _ = _inputs(batch)
    model.eval()
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    compile_s = _timed(fwd, state, x)
    _count_flops("infer", fwd, batch, state, x)

    def run(n):
        t = time.perf_counter()
        for _ in range(n):
            out = fwd(state, x)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    return compile_s, run


def flax_train(batch, dtype):
    """(compile seconds, run(n) -> seconds for n steps) of the jitted AdamW training step."""
    model = build_model(dtype)
    x, y = _inputs(batch)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

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
    state = [params, rest, tx.init(params)]
    t = time.perf_counter()
    out = step(*state, x, y)
    jax.block_until_ready(out)
    state[:] = out[:3]
    compile_s = time.perf_counter() - t
    _count_flops("train", step, batch, *state, x, y)

    def run(n):
        t = time.perf_counter()
        for _ in range(n):
            out = step(*state, x, y)
            state[:] = out[:3]
        jax.block_until_ready(out)
        return time.perf_counter() - t

    return compile_s, run


def flax_steps(batch, dtype, mode, formulation):
    """Builds and compiles ours with the convolution formulation ``formulation``."""
    build = flax_train if mode == "train" else flax_infer
    if formulation == "auto":
        return build(batch, dtype)
    from sipak_jax.models import conv

    saved = conv.PATCHES_MAX_OUTPUT_POSITIONS
    conv.PATCHES_MAX_OUTPUT_POSITIONS = 0  # read when the step is traced (compiled here)
    try:
        return build(batch, dtype)
    finally:
        conv.PATCHES_MAX_OUTPUT_POSITIONS = saved


def torch_steps(batch, dtype, mode, threads, library="torchvision"):
    """(first step's seconds, run(n) -> seconds) of PyTorch in a child process
    (``torch_reference.py``; one process per framework, as users run them)."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "torch_reference.py")]
    cmd += [f"--arch={ARCH}", f"--library={library}"]
    cmd += [f"--image_size={ARGS.image_size}", f"--batch={batch}"]
    cmd += [f"--dtype={dtype}", f"--mode={mode}", f"--threads={threads}"]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    CHILDREN.append(child)
    ready = child.stdout.readline().split()
    if not ready or ready[0] != "ready":
        raise SystemExit(f"error: PyTorch reference did not start ({' '.join(cmd)})")

    def run(n):
        child.stdin.write(f"{n}\n")
        child.stdin.flush()
        return float(child.stdout.readline())

    return float(ready[1]), run


def measure(batch, dtype_name, mode):
    """{name: (compile seconds, [seconds per step of each repeat])}, contenders alternating."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    runs = {}
    for formulation in ARGS.conv.split(","):
        runs[f"flax/{formulation}"] = flax_steps(batch, dtype, mode, formulation)
    if not ARGS.no_torch:
        for library in ARGS.references.split(","):
            lib = "tv" if library == "torchvision" else library
            for threads in map(int, ARGS.torch_threads.split(",")):
                runs[f"torch/{lib}/{threads}t"] = torch_steps(
                    batch, dtype_name, mode, threads, library
                )
    for _, run in runs.values():
        run(1)  # second warm-up step (allocators, oneDNN primitive cache)
    times = {name: [] for name in runs}
    for _ in range(ARGS.repeats):
        for name, (_, run) in runs.items():
            times[name].append(run(ARGS.steps) / ARGS.steps)
    while CHILDREN:
        child = CHILDREN.pop()
        child.stdin.close()
        child.wait()
    return {name: (runs[name][0], times[name]) for name in runs}


def _rows(batch, dtype_name, mode, results):
    gflop = FLOPS.get(mode, float("nan")) / 1e9
    torch_medians = [statistics.median(t) for n, (_, t) in results.items() if n.startswith("torch")]
    ref = min(torch_medians, default=float("nan"))
    rows = []
    for name, (compile_s, times) in results.items():
        s = statistics.median(times)
        row = (
            f"{ARCH} {ARGS.image_size}px {mode:5s} {dtype_name:8s} batch {batch:3d} "
            f"{name:13s}: {1000 * s:8.1f} ms/step [{1000 * min(times):.0f}-{1000 * max(times):.0f}]"
            f" {batch / s:7.2f} img/s {batch * gflop / s:6.1f} GFLOP/s"
        )
        if not name.startswith("torch"):
            row += f" compile {compile_s:5.1f} s | time ratio ours/torch {s / ref:5.2f}x"
        rows.append(row)
    return rows


def _header() -> str:
    abstract = nnx.eval_shape(lambda: registry.create(model_config(ARCH)))
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    flops = ", ".join(f"{k} {v / 1e9:.2f} GFLOP/image" for k, v in FLOPS.items())
    return (
        f"{ARCH}: {params / 1e6:.2f} M parameters; XLA cost analysis at {ARGS.image_size} px: "
        f"{flops}"
    )


def main():
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {ARGS.steps} steps x "
        f"{ARGS.repeats} repeats, median [min-max]; load average {os.getloadavg()}",
        flush=True,
    )
    rows = []
    for mode in ARGS.modes.split(","):
        for dtype_name in ARGS.dtypes.split(","):
            for batch in map(int, ARGS.batch_sizes.split(",")):
                results = measure(batch, dtype_name, mode)
                for row in _rows(batch, dtype_name, mode, results):
                    print(row, flush=True)
                    rows.append(row)
    print(_header(), flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)
    return rows


if __name__ == "__main__":
    main()
