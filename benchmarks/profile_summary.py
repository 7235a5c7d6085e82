"""Where a traced training step spends its time: convolutions, BatchNorm, the optimizer,
augmentation, other device work, and the device idle.

    python benchmarks/profile_summary.py --trace_dir=RUN/plugins/profile --hlo_dir=DUMP

Reads the newest Perfetto trace under `--trace_dir` (`jax.profiler` with
`create_perfetto_trace=True`, as the training loop's `Profile` action writes) and the
optimised HLO that XLA dumped (`XLA_FLAGS=--xla_dump_to=DUMP`, as `benchmarks/gpu.py
--profile` sets, with the persistent compilation cache off: JAX's cache key leaves source
locations out, so a cached executable carries the lines of the run that compiled it). Each
device event names its HLO module and instruction (`hlo_module`,
`hlo_op`); the instruction (for a fusion: every instruction fused into it) is classified by
what it is and by the source file JAX recorded for it:

- `convolution`: a convolution (XLA's or a cuDNN custom call);
- `optimizer`: from optax; `augmentation`: from `sipak_jax/augment.py`;
- `batchnorm`: from flax's normalisation layers; `matmul`: a dot or a cuBLAS call;
- `copy/transpose`, and `other` (the loss, activations, pooling, ...).

Shares are of the traced window: busy time per category (events on one device stream or
thread may overlap another's; the shares then add up to more than the busy union) and `idle`,
the window minus the union of device busy intervals. `host` is the Python thread's time
outside dispatching the step (input pipeline, logging).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import linecache
import os
import re

CATEGORIES = (
    "convolution",
    "optimizer",
    "augmentation",
    "batchnorm",
    "matmul",
    "copy/transpose",
    "other",
)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=(%?[\w.\-]+)")


_FRAME = re.compile(r"stack_frame_id=(\d+)")
_SECTION_LINE = re.compile(r"^(\d+)\s+(.*)$")


def _sections(text: str) -> dict[str, dict[int, str]]:
    """The stack-frame tables XLA appends to a module: FileNames, FunctionNames,
    FileLocations, StackFrames ({id: its text})."""
    out, current = {}, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = out.setdefault(line, {})
        elif current is not None and (m := _SECTION_LINE.match(line)):
            current[int(m.group(1))] = m.group(2)
        elif current is not None and line.strip():
            current = None
    return out


def _fields(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", text)}


def source_of(frame_id: int, tables: dict) -> tuple[str, str]:
    """(file, the source text of the call) of a stack frame: the innermost user frame JAX
    recorded (library frames are left out of these tables)."""
    frame = _fields(tables.get("StackFrames", {}).get(frame_id, ""))
    loc = _fields(tables.get("FileLocations", {}).get(frame.get("file_location_id", -1), ""))
    path = tables.get("FileNames", {}).get(loc.get("file_name_id", -1), '""').strip('"')
    line = linecache.getline(path, loc.get("line", 0))
    if loc.get("line") == loc.get("end_line") and loc.get("end_column", 0) > 0:
        line = line[loc.get("column", 0) : loc["end_column"]]  # 0-based columns
    return path, line.strip()


def parse_hlo(text: str) -> dict[str, list[str]]:
    """{instruction name: the lines it stands for (a fusion: its fused computation's too)}."""
    computations, current, lines_of = {}, None, {}
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line and "=" not in line.split("{")[0]:
            current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            computations[current.lstrip("%")] = []
        elif current is not None and _INSTR.match(line):
            computations[current.lstrip("%")].append(line)
    for body in computations.values():
        for line in body:
            name = _INSTR.match(line).group(1).lstrip("%")
            called = _CALLS.search(line)
            lines_of[name] = [line]
            if called:
                lines_of[name] += computations.get(called.group(1).lstrip("%"), [])
    return lines_of


def classify(lines: list[str], tables: dict) -> str:
    text = "\n".join(lines)
    ops = {m.group(2) for m in map(_INSTR.match, lines) if m}
    if "convolution" in ops or "cudnn$conv" in text:
        return "convolution"
    sources = [source_of(int(f), tables) for f in _FRAME.findall(text)]
    if any(path.endswith("augment.py") for path, _ in sources):
        return "augmentation"
    if any(path.endswith(os.path.join("models", "conv.py")) for path, _ in sources):
        return "convolution"  # our formulations (pointwise, patches, depthwise) as dots
    calls = [code for _, code in sources]
    if any("tx.update" in c or "apply_updates" in c for c in calls):
        return "optimizer"
    if any(re.match(r"self\.\w*(bn|norm)", c) for c in calls):
        return "batchnorm"
    if any(re.match(r"self\.\w*conv", c) for c in calls):  # convolutions run as dots
        return "convolution"
    if "dot" in ops or "cublas" in text:
        return "matmul"
    if ops and ops <= {"copy", "transpose", "bitcast", "parameter", "tuple"}:
        return "copy/transpose"
    return "other"


def load_hlo(hlo_dir: str) -> dict[tuple[str, str], str]:
    """{(module name, instruction): category} from XLA's after-optimisation dumps."""
    out = {}
    for path in glob.glob(os.path.join(hlo_dir, "*after_optimizations.txt")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        module = re.search(r"HloModule\s+([\w.\-]+)", text)
        if module:
            tables = _sections(text)
            for name, lines in parse_hlo(text).items():
                out[(module.group(1), name)] = classify(lines, tables)
    return out


def _union(intervals) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(trace: dict, categories: dict[tuple[str, str], str]) -> dict:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in spans if (e.get("args") or {}).get("hlo_op")]
    if not device:
        raise ValueError("the trace has no device events with an hlo_op: nothing to summarise")
    t0 = min(e["ts"] for e in spans)
    window = max(e["ts"] + e["dur"] for e in spans) - t0
    busy = collections.Counter()
    for e in device:
        key = (e["args"].get("hlo_module", ""), e["args"]["hlo_op"])
        busy[categories.get(key, "other")] += e["dur"]
    python = [e for e in spans if threads.get((e["pid"], e["tid"])) == "python"]
    stepping = _union((e["ts"], e["ts"] + e["dur"]) for e in python if "PjitFunction" in e["name"])
    host = _union((e["ts"], e["ts"] + e["dur"]) for e in python) - stepping
    idle = window - _union((e["ts"], e["ts"] + e["dur"]) for e in device)
    shares = {c: round(busy[c] / window, 4) for c in CATEGORIES}
    shares.update(idle=round(idle / window, 4), host=round(max(host, 0.0) / window, 4))
    return {"window_ms": round(window / 1e3, 2), "device_events": len(device), "shares": shares}


def newest_trace(trace_dir: str) -> str:
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    return max(paths, key=os.path.getmtime)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace_dir", required=True)
    p.add_argument("--hlo_dir", required=True)
    args = p.parse_args(argv)
    path = newest_trace(args.trace_dir)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        trace = json.load(f)
    result = {"trace": path, **summarize(trace, load_hlo(args.hlo_dir))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
