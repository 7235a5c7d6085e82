"""The whole grouped 5-fold study, timed from start to the cross-validation summary.

    python benchmarks/study.py [--cells_per_class=810] [--epochs=30] [--batch_size=256]
        [--image_size=224] [--dtype=bfloat16] [--depth=50] [--width=64]
        [--compilation_cache=DIR|off] [--checkpoint_every_epochs=5] [--workdir=DIR]

What `python main.py --config=configs/resnet50.py:fold=all` does (the recipe from scratch,
every evaluator: calibration, test, shortcut controls, overlays, report) on a synthetic
SIPaKMeD of 5 x `cells_per_class` cells read from the raw tree (no TensorFlow, no TFDS build),
without the head-only phase (weights do not change the speed). Prints the wall time of the
study and, per fold, its wall time, the first step (compilation, or loading it from the
persistent cache), training, evaluation and checkpoint seconds, and how many compilations
the persistent cache answered.

The cache starts empty (`--compilation_cache` defaults to a fresh directory in the workdir),
so fold 0 compiles and folds 1-4 should load: the figure a researcher sees on a first study.
Goal (issue 13): 3 minutes or less on one H200 with the defaults. On a CPU, check it runs:

    python benchmarks/study.py --cells_per_class=12 --epochs=2 --batch_size=8 --image_size=32 \
        --dtype=float32 --depth=18 --width=8
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells_per_class", type=int, default=810)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--compilation_cache", default="", help="DIR, or 'off'; default: fresh")
    p.add_argument("--checkpoint_every_epochs", type=int, default=5)
    p.add_argument("--workdir", default=None)
    return p


def study_config(args, data_root: str, cache_dir: str):
    from configs import resnet50

    config = resnet50.get_config("fold=all")
    config.data_dir = os.path.join(data_root, "tfds")
    config.manual_dir = os.path.join(data_root, "raw")
    config.use_tfds = False
    config.synthetic.cells_per_class = args.cells_per_class
    config.init_from = ""
    config.compute_dtype = args.dtype
    config.model.depth, config.model.width = args.depth, args.width
    config.batch_size = config.eval_batch_size = args.batch_size
    config.image_size = args.image_size
    config.num_epochs, config.head_epochs, config.warmup_epochs = args.epochs, 0, 1
    config.writer = "jsonl"
    config.profile_steps = 0
    config.checkpoint_every_epochs = args.checkpoint_every_epochs
    config.compilation_cache_dir = cache_dir
    return config


class CompileEvents:
    """Counts JAX's compilation-cache events and sums its compile durations."""

    def __init__(self):
        from jax import monitoring

        self.counts, self.seconds = collections.Counter(), collections.Counter()
        monitoring.register_event_listener(self._event)
        monitoring.register_event_duration_secs_listener(self._duration)

    def _event(self, name, **kwargs):
        self.counts[name.rsplit("/", 1)[-1]] += 1

    def _duration(self, name, seconds, **kwargs):
        self.seconds[name.rsplit("/", 1)[-1]] += seconds

    def snapshot(self) -> dict:
        keys = ("cache_hits", "cache_misses")
        out = {k: self.counts.get(k, 0) for k in keys}
        for k in ("backend_compile_duration", "compile_time_saved_sec"):
            out[k] = round(self.seconds.get(k, 0.0), 1)
        return out


def fold_row(workdir: str, fold: int) -> dict:
    with open(os.path.join(workdir, f"fold{fold}", "results.json"), encoding="utf-8") as f:
        timing = json.load(f)["timing"]
    epochs = timing["epochs"]
    return {
        "fold": fold,
        "wall_s": timing["wall_s"],
        "first_step_s": round(timing["first_step_s"], 1),
        "train_s": round(sum(e["train_s"] for e in epochs), 1),
        "eval_s": round(sum(e["eval_s"] for e in epochs), 1),
        "checkpoint_s": round(sum(e["checkpoint_s"] for e in epochs), 1),
    }


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_study_")
    cache = args.compilation_cache or os.path.join(workdir, "xla_cache")
    cache = "" if cache == "off" else cache
    import jax

    from sipak_jax import train

    events = CompileEvents()
    config = study_config(args, os.path.join(workdir, "data"), cache)
    t0 = time.perf_counter()
    summary = train.train_and_evaluate(config, os.path.join(workdir, "run"))
    wall = time.perf_counter() - t0
    folds = [fold_row(os.path.join(workdir, "run"), k) for k in range(5)]
    result = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "model": f"ResNet-{args.depth} width {args.width} {args.dtype}",
        "cells": 5 * args.cells_per_class,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "epochs_per_fold": args.epochs,
        "compilation_cache": cache or "off",
        "study_wall_s": round(wall, 1),
        "compile_events": events.snapshot(),
        "folds": folds,
        "test_accuracy_mean": summary.get("metrics", {}).get("accuracy", {}).get("mean"),
    }
    print("\nStudy benchmark")
    for k, v in result.items():
        print(f"  {k:20s} {v}" if k != "folds" else "  folds:")
        if k == "folds":
            for row in v:
                print(f"    {row}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
