"""Benchmark: augmented 224x224 images per second delivered as device batches.

Builds (or reuses) a synthetic SIPaKMeD of about 4,000 cells through the real TFDS builder,
fills the uint8 cache, then measures side by side, after warm-up, median of `--repeats`:

  host      numpy batches gathered from the cache (`train_dataset`, no device transfer)
  device    `train_batches`: global jax.Arrays on the device (grain pipeline, prefetch 2)
  augmented `train_batches` + the jitted augmentation (`--augment`) and normalisation of
            every batch, blocked until ready: the figure the trainer sees
  reference decode + resize of every example at every step (what a loader without the
            cache does), for the ratio

and the one-off costs: writing the synthetic data, building the TFDS dataset (TensorFlow, in a
subprocess), filling the cache from the array_record files (decode + resize; grain map over
worker threads), and the same decode + resize through a plain ThreadPoolExecutor, for the
ratio.

    python benchmarks/input_pipeline.py --work_dir=/tmp/sipak_bench [--cells_per_class=810]
        [--batch_size=256] [--image_size=224] [--steps=20] [--repeats=5]
        [--augment="rot90,flip_lr,flip_ud,rotate(180)"] [--manual_only]

`--manual_only` reads the manual dir directly (no TFDS, no TensorFlow: the GPU machine path).
Absolute figures on a shared machine are noisy; compare the ratios printed in one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sipak_jax import augment, distributed, input_pipeline, preprocessing  # noqa: E402

SPLITS = tuple(f"fold{i}" for i in range(5))


def _timed(label, fn):
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    print(f"  {label:<44} {dt:8.2f} s", flush=True)
    return out, dt


def _rate(fn, images_per_call, steps, repeats):
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(steps)
        rates.append(images_per_call * steps / (time.perf_counter() - t0))
    return statistics.median(rates), min(rates), max(rates)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", default="/tmp/sipak_bench")
    p.add_argument("--cells_per_class", type=int, default=810)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--resize", default="pad", choices=preprocessing.RESIZE_POLICIES)
    p.add_argument("--steps", type=int, default=20, help="batches per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--augment", default="rot90,flip_lr,flip_ud,rotate(180)")
    p.add_argument("--manual_only", action="store_true", help="no TFDS: read the manual dir")
    p.add_argument(
        "--gen_processes",
        type=int,
        default=min(5, os.cpu_count() or 1),
        help="processes writing the synthetic classes in parallel",
    )
    a = p.parse_args(argv)
    ops = tuple(s for s in _split_ops(a.augment) if s)

    manual = os.path.join(a.work_dir, f"manual_{a.cells_per_class}")
    data = os.path.join(a.work_dir, f"data_{a.cells_per_class}")
    print(
        f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPU cores, "
        f"batch {a.batch_size}, {a.image_size}x{a.image_size}, resize {a.resize}, ops {ops}"
    )
    print("One-off costs:")
    if not os.path.isdir(manual):
        _timed(
            f"write synthetic ({a.cells_per_class}/class, {a.gen_processes} processes)",
            lambda: _write_synthetic(manual, a.cells_per_class, a.gen_processes),
        )
    else:
        print(f"  synthetic data reused from {manual}")
    if not a.manual_only:
        if not os.path.isdir(os.path.join(data, "sipakmed")):
            cmd = [
                sys.executable,
                "-m",
                "tfds_sipakmed.build",
                f"--manual_dir={manual}",
                f"--data_dir={data}",
            ]
            _timed(
                "build TFDS dataset (subprocess, TF)",
                lambda: subprocess.run(
                    cmd,
                    check=True,
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3"),
                ),
            )
        else:
            print(f"  TFDS dataset reused from {data}")
    src = {"manual_dir": manual} if a.manual_only else {}
    data_dir = None if a.manual_only else data
    quiet = lambda s: None  # noqa: E731
    load = lambda: input_pipeline.load_splits(  # noqa: E731
        data_dir, "grouped", SPLITS, a.image_size, a.resize, log=quiet, **src
    )
    cache, fill_s = _timed("fill cache: read + decode + resize (grain)", load)
    n = len(cache)
    print(f"  {n} cells, {cache.image.nbytes / 2**20:.0f} MiB uint8 ({n / fill_s:.0f} cells/s)")
    reference_source = input_pipeline.open_source(
        data_dir, src.get("manual_dir"), "grouped", SPLITS, log=quiet
    )
    _timed("same decode + resize, ThreadPoolExecutor", lambda: _pool_fill(reference_source, a))

    mesh = distributed.make_mesh()
    bs = a.batch_size
    spe = input_pipeline.steps_per_epoch(cache, bs)
    spec = preprocessing.spec_for("torchvision", a.image_size, a.resize)

    @jax.jit
    def step(rng, images):
        # The model's input, materialised (a reduction here would let XLA fuse the gathers
        # into it, which is not what a train step does).
        return preprocessing.normalize(augment.augment(rng, images, ops), spec)

    rng = jax.random.key(0)
    first = next(iter(input_pipeline.train_batches(cache, bs, mesh, seed=0, num_steps=1)))
    t0 = time.perf_counter()
    step(rng, first["image"]).block_until_ready()
    print(f"  compile augment+normalize                    {time.perf_counter() - t0:8.2f} s")

    host_batches = input_pipeline.train_dataset(cache, bs, seed=0)  # grain MapDataset

    def host(steps):
        for s in range(steps):
            host_batches[s]

    def device(steps):
        with input_pipeline.train_batches(cache, bs, mesh, seed=0, num_steps=steps) as it:
            for b in it:
                b["image"].block_until_ready()

    def augmented(steps):
        with input_pipeline.train_batches(cache, bs, mesh, seed=0, num_steps=steps) as it:
            out = None
            for i, b in enumerate(it):
                out = step(jax.random.fold_in(rng, i), b["image"])
            out.block_until_ready()

    def augment_only(steps):
        out = None
        for i in range(steps):
            out = step(jax.random.fold_in(rng, i), first["image"])
        out.block_until_ready()

    def reference(steps):
        for s in range(steps):
            rows = input_pipeline.train_rows(cache, bs, 0, s)
            np.stack(
                [
                    preprocessing.resize_crop(reference_source[r]["image"], a.image_size, a.resize)
                    for r in rows
                ]
            )

    print(
        f"Throughput (images/s, median [min-max] of {a.repeats} x {a.steps} batches of {bs}; "
        f"{spe} batches per epoch):"
    )
    results = {}
    for name, fn, steps, reps in (
        ("host", host, a.steps, a.repeats),
        ("device", device, a.steps, a.repeats),
        ("augment only (one resident batch)", augment_only, a.steps, a.repeats),
        ("augmented (device batches + augment)", augmented, a.steps, a.repeats),
        ("reference (decode + resize per step)", reference, 2, 2),
    ):
        fn(1)  # warm-up
        med, lo, hi = _rate(fn, bs, steps, reps)
        results[name] = med
        print(f"  {name:<40} {med:9.0f}  [{lo:.0f}-{hi:.0f}]", flush=True)
    ref = results["reference (decode + resize per step)"]
    aug = results["augmented (device batches + augment)"]
    print(
        f"Ratios: augmented / reference = {aug / ref:.1f}x; "
        f"device / reference = {results['device'] / ref:.1f}x; goal >= 1500 img/s augmented: "
        f"{'met' if aug >= 1500 else 'NOT met'} ({aug:.0f})."
    )
    return 0


def _pool_fill(source, a):
    """The cache's decode + resize through a plain thread pool (the pre-grain way)."""
    threads = min(8, os.cpu_count() or 1)
    image = np.zeros((len(source), a.image_size, a.image_size, 3), np.uint8)

    def work(i):
        crop = source[i]["image"]
        image[i] = preprocessing.resize_crop(crop, a.image_size, a.resize)
        crop.reshape(-1, 3).mean(0), preprocessing.border_colour(crop)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(len(source))))
    return image


def _write_one_class(args):
    from tfds_sipakmed.synthetic import write_synthetic

    out_dir, cells_per_class, cls = args
    return write_synthetic(out_dir, cells_per_class, seed=0, classes=(cls,))


def _write_synthetic(out_dir, cells_per_class, processes):
    """The same files as write_synthetic(out_dir, n, seed=0): each class has its own seed."""
    import multiprocessing

    from tfds_sipakmed.taxonomy import SIPAKMED

    jobs = [(out_dir, cells_per_class, c) for c in SIPAKMED.class_names]
    if processes <= 1:
        return [_write_one_class(j) for j in jobs]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.map(_write_one_class, jobs)


def _split_ops(text: str):
    """Splits 'a,b(1, 2),c' at top-level commas."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch in "([" and 1 or 0
        depth -= ch in ")]" and 1 or 0
        cur += ch
    out.append(cur.strip())
    return out


if __name__ == "__main__":
    sys.exit(main())
