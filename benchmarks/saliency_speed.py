"""Saliency throughput: our jitted Grad-CAM and Integrated Gradients beside PAIR's `saliency`
package driving the very same jitted model, in the same run.

    python benchmarks/saliency_speed.py [--depth=50] [--size=224] [--ig_steps=64] [--cam_batch=8]
        [--ig_images=1] [--repeats=1]

Ours: Grad-CAM is one jitted call per batch; IG runs all its steps inside one jit
(`--ig_chunk` path points per model call). PAIR: `GradCam().GetMask` (one image per call) and
`IntegratedGradients().GetMask(x_steps=64)` at its default `batch_size=1` and at
`batch_size=--ig_chunk`, through a `call_model_function` built on our jitted gradient
function. Prints maps/s and the ratio. A benchmark, not a test: the numbers depend on the
machine (run it alone; the CPU here is shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sipak_jax import saliency  # noqa: E402
from sipak_jax.models import ResNet  # noqa: E402
from sipak_jax.saliency import cam, integrated  # noqa: E402


def _call_model(fns, target, stage=4):
    import saliency.core as pair

    def call(x_batch, call_model_args=None, expected_keys=None):
        x = jnp.asarray(np.asarray(x_batch), jnp.float32)
        t = jnp.full((x.shape[0],), target, jnp.int32)
        out = {}
        if pair.INPUT_OUTPUT_GRADIENTS in expected_keys:
            g, _ = fns.input_gradients(x, t)
            out[pair.INPUT_OUTPUT_GRADIENTS] = np.asarray(g)
        if pair.CONVOLUTION_LAYER_VALUES in expected_keys:
            a, g, _ = fns.feature_gradients(x, t, "logit", stage)
            out[pair.CONVOLUTION_LAYER_VALUES] = np.asarray(a)
            out[pair.CONVOLUTION_OUTPUT_GRADIENTS] = np.asarray(g)
        return out

    return call


def timed(fn, repeats):
    print(".", end="", flush=True)
    fn()  # compile / warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--ig_steps", type=int, default=64)
    p.add_argument("--ig_chunk", type=int, default=16)
    p.add_argument("--cam_batch", type=int, default=8)
    p.add_argument("--ig_images", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--skip_pair_ig_batch1", action="store_true")
    args = p.parse_args()
    import saliency.core as pair

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; ResNet-{args.depth} at "
        f"{args.size}, float32"
    )
    # Initialised under jit: eager initialisation of ResNet-50 is slow on a CPU.
    model = nnx.jit(lambda: ResNet(args.depth, 5, rngs=nnx.Rngs(0)))()
    fns = saliency.ModelFunctions(model)
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(args.cam_batch, args.size, args.size, 3)).astype(np.float32)
    tb = fns.predict(xb)
    rows = []

    # Grad-CAM.
    ours = timed(lambda: cam.gradient_cam(fns, "gradcam", xb, tb).block_until_ready(), args.repeats)
    rows.append(("Grad-CAM", f"ours (batch {args.cam_batch}, one jit)", args.cam_batch / ours))
    gc = pair.GradCam()
    call = _call_model(fns, int(tb[0]))
    ref = timed(
        lambda: gc.GetMask(xb[0], call, should_resize=False, three_dims=False), args.repeats
    )
    rows.append(("Grad-CAM", "PAIR GradCam (1 image per call)", 1 / ref))

    # Integrated Gradients.
    xi = xb[: args.ig_images]
    ti = tb[: args.ig_images]

    def ours_ig():
        a, _ = integrated.integrated_gradients(
            fns, xi, ti, steps=args.ig_steps, batch_size=args.ig_chunk
        )
        a.block_until_ready()

    ours_ig_t = timed(ours_ig, args.repeats)
    rows.append(
        (
            f"IG {args.ig_steps} steps",
            f"ours (all steps in one jit, {args.ig_chunk} per model call)",
            args.ig_images / ours_ig_t,
        )
    )
    ig = pair.IntegratedGradients()
    call = _call_model(fns, int(ti[0]))
    if not args.skip_pair_ig_batch1:
        t = timed(
            lambda: ig.GetMask(xi[0], call, x_steps=args.ig_steps, batch_size=1), args.repeats
        )
        rows.append((f"IG {args.ig_steps} steps", "PAIR IntegratedGradients batch_size=1", 1 / t))
    t = timed(
        lambda: ig.GetMask(xi[0], call, x_steps=args.ig_steps, batch_size=args.ig_chunk),
        args.repeats,
    )
    rows.append(
        (
            f"IG {args.ig_steps} steps",
            f"PAIR IntegratedGradients batch_size={args.ig_chunk}",
            1 / t,
        )
    )

    print(f"{'method':<14} {'implementation':<50} {'maps/s':>9} {'ours/this':>9}")
    best = {}
    for meth, _impl, rate in rows:
        best.setdefault(meth, rate)
    for meth, impl, rate in rows:
        print(f"{meth:<14} {impl:<50} {rate:9.4f} {best[meth] / rate:9.2f}x")


if __name__ == "__main__":
    main()
