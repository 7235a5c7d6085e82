"""Throughput and latency of the screening service against the command line on the same images.

    python benchmarks/serve.py [--checkpoint=DIR] [--images=256] [--clients=1,8,32]
        [--per_request=1] [--latency_requests=100] [--width=16] [--image_size=64]

Without `--checkpoint` a demo-sized model DIR is written to a temporary directory (ResNet with
one block per stage, width 16, 64 px: the CPU demo's network, random weights: speed only).
`--images` synthetic crops (PNG, 40-120 px) are written beside it. Then, in this order:

1. the command line: `predict.predict_files` (what `python -m sipak_jax.predict` runs: read,
   decode, resize, batches of 32) on the images, in this process, after one warm-up run (the
   compile is not counted); the full command's wall time (start-up, load, compile) is printed
   beside it;
2. the server: `python -m sipak_jax.serve` started as a subprocess (compiles batch sizes
   1, 8, 32 before it listens); for each number of concurrent clients, that many asyncio
   clients (a minimal keep-alive HTTP/1.1 client, one connection each, bodies built before
   the clock starts) send the images, `--per_request` a request, until all are answered:
   images/s, and the ratio to the command line;
3. latency: `--latency_requests` single-image requests one after the other: p50 and p99.

A benchmark, not a test: on a shared CPU the absolute figures move with the load (printed); the
ratios are measured side by side in one run.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: a demo-sized random model")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--per_request", type=int, default=1, help="images in each request")
    p.add_argument("--latency_requests", type=int, default=100)
    p.add_argument("--skip_cli", action="store_true", help="server figures only (ratios vs 1)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument(
        "--server_args", default="", help="extra flags for the server, e.g. --max_wait_ms=2"
    )
    return p.parse_args()


def make_model(path, width, image_size):
    from flax import nnx

    from sipak_jax import model_io, preprocessing
    from sipak_jax.models import ResNet
    from tfds_sipakmed.taxonomy import SIPAKMED

    model = ResNet(18, 5, width=width, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=SIPAKMED,
        preprocessing=preprocessing.spec_for("scratch", image_size=image_size),
    )
    model_io.save_model_dir(path, model, meta)


def make_images(d, n) -> list[str]:
    from tests.serve_fixtures import cell, encode

    os.makedirs(d, exist_ok=True)
    paths = []
    for k in range(n):
        path = os.path.join(d, f"cell{k:04d}.png")
        with open(path, "wb") as f:
            f.write(encode(cell(k, 40 + k % 80, 40 + (k * 7) % 80)))
        paths.append(path)
    return paths


def command_line(checkpoint, paths, tmp):
    from sipak_jax import ensemble, predict

    predictor = ensemble.load_predictor(checkpoint)
    predict.predict_files(predictor, paths[:32])  # compile
    t0 = time.perf_counter()
    rows = predict.predict_files(predictor, paths)
    seconds = time.perf_counter() - t0
    assert all(r["error"] is None for r in rows)
    t0 = time.perf_counter()
    out = os.path.join(tmp, "cli.jsonl")
    cmd = [sys.executable, "-m", "sipak_jax.predict", f"--checkpoint={checkpoint}"]
    subprocess.run([*cmd, f"--output={out}", os.path.dirname(paths[0])], check=True, cwd=ROOT)
    return len(paths) / seconds, time.perf_counter() - t0


def start_server(checkpoint, port, extra=()):
    import httpx

    from tests.serve_fixtures import free_port

    port = port or free_port()
    cmd = [sys.executable, "-m", "sipak_jax.serve", f"--checkpoint={checkpoint}", f"--port={port}"]
    cmd += list(extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    while True:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > 600:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


BOUNDARY = "sipakbenchboundary"


def multipart(blobs) -> bytes:
    """A multipart body of `files` parts, built once (the client does no work per request)."""
    out = []
    for k, blob in enumerate(blobs):
        out.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="c{k}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
        )
        out.append(blob + b"\r\n")
    out.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(out)


class Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams. httpx's per-request Python
    work, on these 2 cores, cost more than the server's (32 httpx clients reached 73 GET
    /healthz a second where this client reaches about 1,300): the benchmark measures the
    server, so the client must be cheap."""

    def __init__(self, url):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)

    async def __aenter__(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc):
        self.writer.close()

    async def post(self, path, body: bytes) -> dict:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        headers = (await self.reader.readuntil(b"\r\n\r\n")).decode().lower()
        status = int(headers.split(" ", 2)[1])
        length = int(headers.split("content-length:")[1].split("\r\n")[0])
        payload = json.loads(await self.reader.readexactly(length))
        if status != 200:
            raise RuntimeError(f"{status}: {payload}")
        return payload


async def _clients(url, blobs, clients, per_request):
    bodies = [multipart(blobs[i : i + per_request]) for i in range(0, len(blobs), per_request)]
    answered = []

    async def client():
        async with Connection(url) as conn:
            while bodies:
                answered.extend((await conn.post("/api/v1/predict", bodies.pop()))["rows"])

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - t0
    assert len(answered) == len(blobs) and all(r["error"] is None for r in answered)
    return len(blobs) / seconds


async def _latency(url, blob, n):
    body, times = multipart([blob]), []
    async with Connection(url) as conn:
        for _ in range(n):
            t0 = time.perf_counter()
            await conn.post("/api/v1/predict", body)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * statistics.median(times), 1000 * times[min(n - 1, int(0.99 * n))]


def main():
    args = parse_args()
    tmp = tempfile.mkdtemp(prefix="sipak_serve_bench_")
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = os.path.join(tmp, "model")
        make_model(checkpoint, args.width, args.image_size)
    paths = make_images(os.path.join(tmp, "cells"), args.images)
    blobs = [open(p, "rb").read() for p in paths]
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"model {checkpoint}; {len(paths)} images; {args.per_request} image(s) per request")
    cli, cli_wall = (1.0, 0.0) if args.skip_cli else command_line(checkpoint, paths, tmp)
    print(f"command line (predict_files, warm): {cli:.1f} img/s; whole command {cli_wall:.1f} s")
    proc, url, start = start_server(checkpoint, args.port, args.server_args.split())
    try:
        print(f"server ready in {start:.1f} s (load + compile 1, 8, 32)")
        for c in [int(x) for x in args.clients.split(",")]:
            rate = asyncio.run(_clients(url, blobs, c, args.per_request))
            print(
                f"server, {c:>2} clients: {rate:.1f} img/s  "
                f"ratio to the command line {rate / cli:.2f}"
            )
        p50, p99 = asyncio.run(_latency(url, blobs[0], args.latency_requests))
        print(
            f"single-image latency over {args.latency_requests} requests: "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
