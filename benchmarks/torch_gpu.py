"""PyTorch's ResNet-50 training step on a GPU: the reference for `benchmarks/gpu.py`.

    python benchmarks/torch_gpu.py [--batch_size=256] [--image_size=224] [--steps=60]
        [--warmup=15] [--no_compile] [--device=cuda]

torchvision ResNet-50 (v1.5, as ours), channels_last, bfloat16 autocast, `torch.compile`,
AdamW, label-smoothed cross-entropy; the batch is uint8 on the device, converted and
normalised inside the step (ours also augments inside its step: rot90/flip/rotation, a few
percent of the step). Prints images/s after `--warmup` steps (compilation excluded) and the
compile time, one JSON line last. Where PyTorch (or a GPU) is missing it says so and exits 0,
so a benchmark script can run it everywhere. On a CPU, to check it runs:

    python benchmarks/torch_gpu.py --device=cpu --batch_size=4 --image_size=64 --steps=2 \
        --warmup=1 --no_compile
"""

from __future__ import annotations

import argparse
import json
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--device", default="cuda")
    return p


def make_step(torch, torchvision, device: str, compile_model: bool):
    model = torchvision.models.resnet50(num_classes=5).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    net = torch.compile(model) if compile_model else model
    dtype = torch.bfloat16

    def step(images_uint8, labels):
        x = images_uint8.permute(0, 3, 1, 2).float().sub_(mean).div_(std)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype):
            loss = loss_fn(net(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def main(argv=None) -> dict | None:
    args = _parser().parse_args(argv)
    try:
        import torch
        import torchvision
    except ImportError:
        print("PyTorch/torchvision are not installed here: no PyTorch reference figure.")
        return None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("PyTorch sees no CUDA device here: no PyTorch GPU reference figure.")
        return None
    torch.backends.cudnn.benchmark = True
    step = make_step(torch, torchvision, args.device, not args.no_compile)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=args.device)
    labels = torch.randint(0, 5, (args.batch_size,), device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(images, labels)
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(images, labels)
    sync()
    run_s = time.perf_counter() - t0
    result = {
        "framework": f"torch {torch.__version__} torchvision {torchvision.__version__}",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "compiled": not args.no_compile,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "warmup_s": round(warm_s, 1),
        "images_per_s": round(args.steps * args.batch_size / run_s, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
