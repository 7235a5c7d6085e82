"""Training throughput on a GPU: the ResNet-50 recipe in bfloat16 at batch 256 on a synthetic
SIPaKMeD of about 4,000 cells, without TensorFlow or TFDS.

    python benchmarks/gpu.py [--cells_per_class=810] [--epochs=6] [--batch_size=256]
        [--image_size=224] [--workdir=DIR] [--profile]

`--profile` traces 5 steps after warm-up and prints where they spent their time
(`benchmarks/profile_summary.py`: convolutions, BatchNorm, optimizer, augmentation, idle).

Needs jax (CUDA), flax, optax, orbax-checkpoint, numpy, opencv, clu and ml_collections (pure
Python wheels); never imports TensorFlow or tensorflow_datasets: the synthetic tree
(`tfds_sipakmed.synthetic`, one process per class) is read directly by the input pipeline's
TF-free path (`tfds_sipakmed.layout` + `folds` -> cached uint8 arrays), and the writer falls
back to console + JSON lines.

Runs `train.train_one_fold` with `configs/resnet50.py` (from scratch: weights do not change
the speed; no head-only phase, so one compiled step) and prints:
- images/s of training (steps x batch / training time, epochs after the first; compilation,
  validation and checkpoints excluded) and per device;
- the share of the training time spent waiting for the input pipeline;
- compile time, validation + checkpoint time per epoch, peak device memory.
Reference figures (published): (A100 PyTorch AMP+DALI: about 2,470 img/s;
H100 MLPerf: 7,162 img/s).
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tfds_sipakmed.taxonomy import SIPAKMED  # noqa: E402 - needs the path above


def _write_class(args):
    out_dir, cells_per_class, cls = args
    from tfds_sipakmed import synthetic

    synthetic.write_synthetic(out_dir, cells_per_class=cells_per_class, seed=0, classes=(cls,))
    return cls


def write_synthetic_parallel(out_dir: str, cells_per_class: int) -> float:
    """The synthetic tree, one process per class (identical to a sequential write)."""
    if os.path.isdir(out_dir):
        return 0.0
    t0 = time.perf_counter()
    partial = out_dir + ".partial"
    os.makedirs(partial, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(SIPAKMED.num_classes) as pool:
        pool.map(_write_class, [(partial, cells_per_class, c) for c in SIPAKMED.class_names])
    os.replace(partial, out_dir)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells_per_class", type=int, default=810)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--overlay_cells", type=int, default=0, help="Grad-CAM overlays per epoch (compiles more)"
    )
    p.add_argument("--profile", action="store_true", help="trace 5 steps and summarise them")
    args = p.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_gpu_")
    hlo_dir = os.path.join(workdir, "hlo")
    if args.profile:  # before JAX starts: XLA reads its flags once
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={hlo_dir}"
    raw = os.path.join(workdir, "data", "raw")
    gen_s = write_synthetic_parallel(raw, args.cells_per_class)

    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from configs import resnet50
    from sipak_jax import train

    config = resnet50.get_config()
    config.data_dir = os.path.join(workdir, "data")
    config.use_tfds = False
    config.synthetic.cells_per_class = args.cells_per_class
    config.init_from = ""
    config.compute_dtype = args.dtype
    config.batch_size = args.batch_size
    config.eval_batch_size = args.batch_size
    config.image_size = args.image_size
    config.num_epochs = args.epochs
    config.head_epochs = 0
    config.warmup_epochs = 1
    config.log_every_steps = 10
    config.writer = "jsonl"
    config.profile_steps = 5 if args.profile else 0
    if args.profile:  # a cached executable keeps the source lines of the run that compiled it
        config.compilation_cache_dir = ""
    config.evaluators = ("test",)  # no calibration, shortcuts, overlays or report
    config.num_overlay_cells = args.overlay_cells

    t0 = time.perf_counter()
    results = train.train_one_fold(config, os.path.join(workdir, "run"), 0)
    wall = time.perf_counter() - t0
    timing = results["timing"]
    epochs = timing["epochs"][1:] or timing["epochs"]
    steps = sum(e["steps"] for e in epochs)
    train_s = sum(e["train_s"] for e in epochs)
    images_per_s = steps * args.batch_size / train_s
    n_dev = jax.device_count()
    wait_share = timing["data_wait_s"] / sum(e["train_s"] for e in timing["epochs"])
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    summary = {
        "device": f"{n_dev} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "model": f"ResNet-{config.model.depth} {config.model.variant}",
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "cells": args.cells_per_class * SIPAKMED.num_classes,
        "train_examples_per_epoch": steps // max(len(epochs), 1) * args.batch_size,
        "images_per_s": round(images_per_s, 1),
        "images_per_s_per_device": round(images_per_s / n_dev, 1),
        "data_wait_share": round(wait_share, 4),
        "first_step_compile_s": timing["first_step_s"],
        "eval_s_per_epoch": round(sum(e["eval_s"] for e in epochs) / len(epochs), 3),
        "checkpoint_s_per_epoch": round(sum(e["checkpoint_s"] for e in epochs) / len(epochs), 3),
        "peak_device_memory_gib": None if peak is None else round(peak / 2**30, 2),
        "synthetic_generation_s": round(gen_s, 1),
        "run_wall_s": round(wall, 1),
        "test_accuracy": results["test"]["accuracy"],
        "tensorflow_imported": "tensorflow" in sys.modules,
        "tfds_imported": "tensorflow_datasets" in sys.modules,
    }
    print("\nGPU training benchmark")
    for k, v in summary.items():
        print(f"  {k:28s} {v}")
    print(json.dumps(summary))
    if args.profile:
        import profile_summary

        trace_dir = os.path.join(workdir, "run", "plugins", "profile")
        profile_summary.main([f"--trace_dir={trace_dir}", f"--hlo_dir={hlo_dir}"])


if __name__ == "__main__":
    main()
