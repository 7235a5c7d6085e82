"""PyTorch side of `benchmarks/model.py`, run in its own process.

torchvision's or timm's ``--arch`` (``resnet50``, ``convnext_tiny``, ...; channels_last,
1000 classes, random weights), AdamW, cross-entropy: the same step as ours.
Run by ``model.py`` as a child process so that the two frameworks do not share an allocator
(in one process a ResNet-50 step of either got up to 1.6x slower after the other ran: the
kernel time spent faulting in freshly mapped memory grew five-fold). Protocol on stdin/stdout,
one line each: it prints ``ready <seconds of the first step>``, then for every line ``n`` it
reads it runs ``n`` steps and prints their total seconds; it exits at end of input.

    python benchmarks/torch_reference.py --arch=resnet18 [--library=torchvision|timm]
        --image_size=64 --batch=32
        [--dtype=float32] [--mode=train] [--threads=2]
"""

from __future__ import annotations

import argparse
import sys
import time

LEARNING_RATE, WEIGHT_DECAY = 1e-3, 1e-4  # as model.py


def build(arch, library, image_size, batch, dtype, mode):
    """A function running one step of the library's ``arch``."""
    import torch

    if library == "timm":
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=1000)
    else:
        import torchvision

        model = getattr(torchvision.models, arch)()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,))

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    if mode == "infer":
        model.eval()

        def one():
            with torch.inference_mode(), autocast():
                model(x)

        return one
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def one():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return one


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True)
    p.add_argument("--library", default="torchvision", choices=("torchvision", "timm"))
    p.add_argument("--image_size", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mode", default="train", choices=("train", "infer"))
    p.add_argument("--threads", type=int, required=True)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    one = build(a.arch, a.library, a.image_size, a.batch, a.dtype, a.mode)
    t = time.perf_counter()
    one()
    print(f"ready {time.perf_counter() - t}", flush=True)
    for line in sys.stdin:
        t = time.perf_counter()
        for _ in range(int(line)):
            one()
        print(time.perf_counter() - t, flush=True)


if __name__ == "__main__":
    main()
