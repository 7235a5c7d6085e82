"""Benchmark: an exported ResNet in ONNX Runtime beside torchvision's own ONNX export of the
same architecture in the same runtime, and beside our jitted JAX model (time ratios).

    python benchmarks/onnx_export.py [--depth=50] [--image_size=224] [--batch_size=10]
        [--repeats=5] [--work_dir=/tmp/sipak_onnx_bench]

Builds a model DIR (random weights, 5 classes, torchvision normalisation), exports it with
`python -m sipak_jax.export` (timed, wall clock, in a child process as a user runs it),
exports torchvision's `resnet{depth}` (random weights, 5 classes) with `torch.onnx.export`
(opset 17, dynamic batch), then alternates `--repeats` rounds of: ONNX Runtime on ours (uint8
NHWC input, normalisation inside), ONNX Runtime on torchvision's (float32 NCHW input), our
`Predictor.probabilities`. Prints the median seconds per batch of each and the ratios to
torchvision's ONNX (lower is better), with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _model_dir(path, depth, size):
    from sipak_jax import model_io, preprocessing
    from tfds_sipakmed.taxonomy import SIPAKMED

    model = model_io.model_from_config({"depth": depth, "variant": "v1.5", "num_classes": 5})
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=SIPAKMED,
        preprocessing=preprocessing.spec_for("torchvision", size),
        temperature=1.3,
    )
    model_io.save_model_dir(path, model, meta)


def _torchvision_onnx(path, depth, size):
    import torch
    import torchvision

    net = getattr(torchvision.models, f"resnet{depth}")(num_classes=5).eval()
    torch.onnx.export(
        net, torch.zeros(1, 3, size, size), path, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip


def _median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work_dir", default="/tmp/sipak_onnx_bench")
    a = p.parse_args()
    print(f"load average before: {os.getloadavg()}")
    model_dir, ours = os.path.join(a.work_dir, "model"), os.path.join(a.work_dir, "ours.onnx")
    theirs = os.path.join(a.work_dir, "torchvision.onnx")
    if not os.path.isdir(model_dir):
        _model_dir(model_dir, a.depth, a.image_size)
    for f in (ours, f"{ours}.json", theirs):
        if os.path.exists(f):
            os.remove(f)
    start = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "sipak_jax.export",
        f"--checkpoint={model_dir}",
        f"--output={ours}",
    ]
    subprocess.run(cmd, check=True)
    print(f"export: {time.perf_counter() - start:.1f} s wall, {os.path.getsize(ours) / 1e6:.1f} MB")
    _torchvision_onnx(theirs, a.depth, a.image_size)

    import onnxruntime as ort

    from sipak_jax import model_io, predict

    rng = np.random.default_rng(0)
    s, n = a.image_size, a.batch_size
    images = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32) / 255.0
    ours_session = ort.InferenceSession(ours, providers=["CPUExecutionProvider"])
    their_session = ort.InferenceSession(theirs, providers=["CPUExecutionProvider"])
    predictor = predict.Predictor(*model_io.load_model_dir(model_dir), batch_size=n)
    contenders = {
        "onnxruntime, ours": lambda: ours_session.run(None, {"images": images}),
        "onnxruntime, torchvision's export": lambda: their_session.run(None, {"x": nchw}),
        "jax, ours (Predictor)": lambda: predictor.probabilities(images),
    }
    results = {name: [] for name in contenders}
    for _ in range(a.repeats):
        for name, fn in contenders.items():
            results[name].append(_median_seconds(fn, 1))
    reference = float(np.median(results["onnxruntime, torchvision's export"]))
    for name, times in results.items():
        t = float(np.median(times))
        print(f"{name:36s} {t:.3f} s per batch of {n}  ratio {t / reference:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
