"""Host overhead of the training loop: steps/s of the whole loop against the bare jitted step.

    python benchmarks/train_loop.py [--image_size=64] [--batch_size=32] [--epochs=4]
        [--width=16] [--cells_per_class=60] [--repeats=3] [--checkpoint_every_epochs=N]

Runs `train.train_one_fold` on a synthetic SIPaKMeD read TF-free (the demo's small ResNet
unless told otherwise), then, in the same process, the trainer's own jitted update step
(`train_setup.setup(...).full_step`) alone on one batch already on the device, and prints side
by side (both after compilation):

- bare step: steps/s of the jitted step called back to back (median of `--repeats`);
- loop, training only: steps/s between epoch starts and epoch-end metric reads (input
  pipeline, augmentation, dispatch, metrics, logging);
- loop, everything: the same including per-epoch validation, overlays and checkpoints;
- the share of the loop's training time spent waiting for the input pipeline.

The ratio loop/bare is the host overhead (1.0 = none). A benchmark, not a test: figures on a
shared machine vary; compare the ratio.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--cells_per_class", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--checkpoint_every_epochs", type=int, default=None, help="default: the config's"
    )
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    return p.parse_args()


def bench_config(args, data_root):
    from configs import demo

    config = demo.get_config()
    config.data_dir = data_root
    config.use_tfds = False
    config.synthetic.cells_per_class = args.cells_per_class
    config.image_size = args.image_size
    config.model.width = args.width
    config.batch_size = args.batch_size
    config.num_epochs = args.epochs
    config.log_every_steps = 10
    config.writer = "jsonl"
    config.evaluators = ()  # the loop only: no test fold, calibration or report
    config.num_overlay_cells = 0
    if args.checkpoint_every_epochs is not None:
        config.checkpoint_every_epochs = args.checkpoint_every_epochs
    return config


def bare_step_rate(run, steps: int, repeats: int) -> float:
    """Steps/s of the trainer's own jitted update alone, on one device-resident batch."""
    import jax

    batch = next(iter(run.data.train_batches(0)))
    state, metrics = run.full_step(run.state, run.empty_metrics(), batch)  # compile
    jax.block_until_ready(state)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = run.full_step(state, metrics, batch)
        jax.block_until_ready(state)
        rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def main():
    args = parse_args()
    import jax

    from sipak_jax import console, train, train_data, train_setup

    console.quiet_libraries(0)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_loop_")
    data_root = os.path.join(workdir, "data")
    config = bench_config(args, data_root)
    t0 = time.perf_counter()
    results = train.train_one_fold(config, os.path.join(workdir, "run"), 0)
    wall = time.perf_counter() - t0
    timing = results["timing"]
    # The first epoch compiles the evaluation step: leave it out of both rates.
    epochs = timing["epochs"][1:]
    train_steps = sum(e["steps"] for e in epochs)
    train_s = sum(e["train_s"] for e in epochs)
    all_s = train_s + sum(e["eval_s"] + e["checkpoint_s"] for e in epochs)
    loop_rate = train_steps / train_s
    loop_all_rate = train_steps / all_s

    plan = train_data.plan_dataset(config, workdir)
    run = train_setup.setup(config, os.path.join(workdir, "bare"), 0, plan, "")
    try:
        bare = bare_step_rate(run, steps=max(20, run.steps_per_epoch), repeats=args.repeats)
    finally:
        run.ckpt.close()
    data = run.data

    print(
        f"\ntrain loop benchmark: {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"ResNet-{config.model.depth} width {config.model.width} stages "
        f"{tuple(config.model.stage_sizes)}, {config.image_size}px, batch {config.batch_size}, "
        f"{len(epochs) + 1} epochs of {data.steps_per_epoch} steps (the first left out)"
    )
    print(f"  first step (compile)               {timing['first_step_s']:8.2f} s")
    print(f"  bare jitted step                   {bare:8.2f} steps/s  (reference)")
    print(
        f"  loop, training only                {loop_rate:8.2f} steps/s  "
        f"ratio {loop_rate / bare:.3f}"
    )
    print(
        f"  loop, with eval + checkpoints      {loop_all_rate:8.2f} steps/s  "
        f"ratio {loop_all_rate / bare:.3f}"
    )
    ckpt_s = sum(e["checkpoint_s"] for e in epochs) / max(len(epochs), 1)
    print(
        f"  checkpoint per epoch               {ckpt_s:8.3f} s  "
        f"(checkpoint_every_epochs={config.checkpoint_every_epochs}; new bests always saved)"
    )
    wait = 100 * timing["data_wait_s"] / timing["loop_s"]
    print(f"  waiting for data                   {wait:8.2f} % of the loop")
    print(f"  whole run (with data build)        {wall:8.1f} s; workdir {workdir}")


if __name__ == "__main__":
    main()
