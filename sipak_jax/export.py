"""Export a model DIR for deployment: `python -m sipak_jax.export --checkpoint=DIR --output=F`.

    python -m sipak_jax.export --checkpoint=workdirs/demo --format=onnx --output=sipak.onnx

`--checkpoint` is one model DIR (a training workdir: its best checkpoint, or `--step=N`; or a
converted-weights DIR), loaded by `sipak_jax.model_io.load_model_dir`. Writes two files and
refuses to overwrite either:

- `F.onnx`: the ONNX graph (opset `export_graph.OPSET`) built by `sipak_jax.export_graph`.
  Input `images`: uint8 [batch, S, S, 3], RGB, each cell crop already resized to S x S by the
  model's resize policy (`preprocessing.resize`, described in the metadata's `input`), the
  normalisation (`preprocessing.channel_order`, `mean`, `std`) done inside the graph. Output
  `probabilities`: float32 [batch, K], softmax(logits / temperature) in the order of
  `taxonomy.class_names`; the same numbers as `python -m sipak_jax.predict` gives. The batch
  dimension is dynamic.
- `F.onnx.json`: the deployment metadata (`deployment_metadata`): `format`, `input`,
  `output`, `taxonomy`, `preprocessing`, `temperature`, `model`, `source` (the model DIR, the
  step, where its weights came from), `exported_with` (versions). The same keys are stored in
  the ONNX file's `metadata_props`, each value as JSON text; `read_onnx_metadata(F.onnx)`
  gives them back as this dict.

Before anything is written, the graph is run in ONNX Runtime beside the JAX function it came
from (the model as `predict` runs it) on random images; a difference above `--tolerance`
(default `TOLERANCE`, 1e-4) is an error and nothing is written.
The console gets one line saying where the files are; mistakes end in one `error:` line
(exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from sipak_jax import console

FORMATS = ("onnx",)
FORMAT = "sipak_jax.onnx/1"
TOLERANCE = 1e-4  # max |ONNX Runtime - JAX| of a probability

RESIZE_DESCRIPTIONS = {
    "pad": (
        "pad the RGB crop to a square of side max(H, W), centred (an odd pixel of padding at "
        "the bottom/right), filled with its border colour (per channel, the lower median of "
        "the crop's outermost pixel ring), then resize to {size} x {size} (cv2.INTER_AREA when "
        "shrinking, cv2.INTER_LINEAR when enlarging): sipak_jax.preprocessing.resize_crop"
    ),
    "stretch": (
        "resize the RGB crop to {size} x {size}, each axis on its own (cv2.INTER_AREA when "
        "shrinking, cv2.INTER_LINEAR when enlarging): sipak_jax.preprocessing.resize_crop"
    ),
}

__all__ = [
    "FORMAT",
    "FORMATS",
    "MismatchError",
    "deployment_metadata",
    "export",
    "main",
    "read_onnx_metadata",
]


class MismatchError(RuntimeError):
    """The exported graph does not compute what the JAX model computes (nothing written)."""


def sidecar_path(output: str) -> str:
    """The metadata file written beside `output`."""
    return f"{output}.json"


def _versions() -> dict:
    from importlib import metadata

    from sipak_jax import export_graph

    out = {"onnx_opset": export_graph.OPSET}
    for package in ("jax", "flax", "jax2onnx", "onnx"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def deployment_metadata(meta, checkpoint: str) -> dict:
    """The metadata of an export of the model DIR `checkpoint` (its `ModelMetadata` `meta`)."""
    from sipak_jax import export_graph

    size, spec = int(meta.preprocessing["image_size"]), dict(meta.preprocessing)
    resize = spec.get("resize", "pad")
    return {
        "format": FORMAT,
        "input": {
            "name": export_graph.INPUT_NAME,
            "dtype": "uint8",
            "shape": [export_graph.BATCH_DIM, size, size, 3],
            "layout": "NHWC",
            "channels": "RGB",
            "before_the_graph": f"{resize}: " + RESIZE_DESCRIPTIONS[resize].format(size=size),
            "inside_the_graph": (
                "float32, channels to preprocessing.channel_order, (x - mean) / std (0-255 scale)"
            ),
        },
        "output": {
            "name": export_graph.OUTPUT_NAME,
            "dtype": "float32",
            "shape": [export_graph.BATCH_DIM, len(meta.class_names)],
            "what": "softmax(logits / temperature), in the order of taxonomy.class_names",
        },
        "taxonomy": meta.taxonomy.to_dict(),
        "preprocessing": spec,
        "temperature": float(meta.temperature),
        "model": dict(meta.model),
        "source": {
            "checkpoint": os.path.abspath(checkpoint),
            "kind": meta.kind,
            "step": meta.step,
            "step_reason": meta.step_reason,
            "fold": meta.fold,
            "weights": meta.source,
        },
        "exported_with": _versions(),
    }


def read_onnx_metadata(model) -> dict:
    """The deployment metadata stored in an ONNX file (a path or a loaded `ModelProto`)."""
    import onnx

    proto = onnx.load(os.fspath(model), load_external_data=False) if _is_path(model) else model
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _check_output(output: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise console.UserError(f"--format={fmt!r} is not supported; one of {list(FORMATS)}.")
    if not output.endswith(".onnx"):
        raise console.UserError(f"--output={output!r} must end in .onnx.")
    for path in (output, sidecar_path(output)):
        if os.path.lexists(path):
            raise console.UserError(
                f"{path} exists; export never overwrites: choose another --output or move it."
            )


def _load(checkpoint: str, step: int | None):
    from sipak_jax import model_io

    if "," in checkpoint or os.path.isdir(os.path.join(checkpoint, "fold0")):
        raise console.UserError(
            f"--checkpoint={checkpoint}: export takes one model DIR, not an ensemble; export "
            "each member (e.g. DIR/fold0) on its own."
        )
    try:
        model, meta = model_io.load_model_dir(checkpoint, step=step)
    except (OSError, ValueError, KeyError) as e:
        raise console.UserError(f"--checkpoint={checkpoint}: {e}") from None
    if meta.taxonomy is None:
        raise console.UserError(
            f"--checkpoint={checkpoint} is a headless model (model.num_classes 0): it has no "
            "classes to export."
        )
    return model, meta


def _write(output: str, proto, info: dict) -> None:
    from sipak_jax import fileio

    fileio.atomic_write_bytes(output, proto.SerializeToString())
    try:
        fileio.atomic_write_json(sidecar_path(output), info)
    except BaseException:
        os.remove(output)
        raise
    # Files to copy to a web server or into an app: readable as the umask allows (the
    # temporary files behind atomic writes are created 0600).
    umask = os.umask(0)
    os.umask(umask)
    for path in (output, sidecar_path(output)):
        os.chmod(path, 0o666 & ~umask)


def export(
    checkpoint: str, output: str, *, fmt="onnx", step=None, tolerance=TOLERANCE, quiet=True
) -> dict:
    """Exports the model DIR `checkpoint` to `output` (module docstring). Returns `{"output",
    "sidecar", "max_difference", "bytes", "metadata"}`. Raises `console.UserError` for the
    user's mistakes and `MismatchError` when ONNX Runtime is more than `tolerance` from
    JAX (the model as `predict` runs it)."""
    import onnx

    from sipak_jax import export_graph

    output = os.fspath(output)
    _check_output(output, fmt)
    if not tolerance > 0:
        raise console.UserError(f"--tolerance must be a positive number, got {tolerance}.")
    model, meta = _load(os.fspath(checkpoint), step)
    spec, size = meta.preprocessing, int(meta.preprocessing["image_size"])
    proto = export_graph.onnx_model(model, spec, meta.temperature, quiet=quiet)
    info = deployment_metadata(meta, os.fspath(checkpoint))
    proto.doc_string = (
        f"Cell classifier ({', '.join(meta.class_names)}): uint8 RGB [batch, {size}, {size}, "
        "3] crops resized as metadata 'input' says -> probabilities [batch, K]."
    )
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in info.items()})
    fn = export_graph.probabilities_function(model, spec, meta.temperature, plain=False)
    diff = export_graph.check_against_jax(proto, fn, size)
    if not diff <= tolerance:
        raise MismatchError(
            f"the ONNX graph differs from the JAX model by {diff:.3g} (> --tolerance={tolerance})"
            " on random images; nothing was written. Please report it with the model DIR's "
            "metadata.json."
        )
    _write(output, proto, info)
    return {
        "output": output,
        "sidecar": sidecar_path(output),
        "max_difference": diff,
        "bytes": os.path.getsize(output),
        "metadata": info,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sipak_jax.export",
        description="Export a model DIR as an ONNX graph (uint8 crops in, probabilities out).",
    )
    p.add_argument("--checkpoint", required=True, help="one model DIR (training or converted)")
    p.add_argument("--format", default="onnx", help="onnx (the only format)")
    p.add_argument("--output", required=True, help="FILE.onnx (FILE.onnx.json is written too)")
    p.add_argument("--step", type=int, default=None, help="a training workdir's step")
    p.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help="largest |ONNX Runtime - JAX| allowed"
    )
    p.add_argument("--verbosity", type=int, default=0, help="1: show the libraries' log lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 written, 1 the graph disagreed with JAX,
    2 the user's mistake)."""
    args = _parser().parse_args(argv)
    console.quiet_libraries(args.verbosity)
    try:
        done = export(
            args.checkpoint,
            args.output,
            fmt=args.format,
            step=args.step,
            tolerance=args.tolerance,
            quiet=args.verbosity < 1,
        )
    except console.UserError as e:
        console.fail(str(e))
        return console.EXIT_USER_ERROR
    except MismatchError as e:
        console.fail(str(e))
        return 1
    info = done["metadata"]
    console.say(
        f"wrote {done['output']} ({done['bytes'] / 1e6:.1f} MB) and {done['sidecar']}: uint8 "
        f"{info['input']['shape']} -> probabilities {info['output']['shape']} at T="
        f"{info['temperature']:g}; ONNX Runtime equals JAX to {done['max_difference']:.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
