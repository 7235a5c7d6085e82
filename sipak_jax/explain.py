"""Saliency overlays for cell images from a model DIR.

    python -m sipak_jax.explain --checkpoint=DIR --method=gradcam,ig --output_dir=OUT \
        [--save_raw] IMAGE_OR_DIR...

DIR is a training workdir or a converted-weights DIR (`sipak_jax.model_io.load_model_dir`),
or an ensemble (`A,B,C` or a `fold=all` workdir, `sipak_jax.ensemble`): each member computes
its map of the same class (the ensemble's predicted class: the argmax of the mean of the
members' temperature-scaled probabilities, unless `--target`), each normalised to [0, 1], and
the overlay shows their mean (dimmer where the members look at different places); with
`--save_raw` the `.npy` is that mean of normalised maps (raw maps of different models have no
common scale), and the IG completeness gap is the members' mean.
For every image and method it writes `OUT/<stem>.<method>.png`, the map overlaid on the
original crop at the crop's own size, and with `--save_raw` `OUT/<stem>.<method>.npy`, the raw
map as H x W float32 at the model's input resolution. A directory argument contributes the
images directly inside it (.bmp .png .jpg .jpeg .tif .tiff). Existing files are never replaced
(the run stops before computing anything) unless `--overwrite`; every output stays inside OUT.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from sipak_jax.imageio import IMAGE_EXTENSIONS, is_image_file

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags (defined only when run as a command, so that importing this
    module beside other commands never clashes)."""
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Model DIR (training workdir or converted), A,B,C or a fold=all workdir.",
    )
    flags.DEFINE_list(
        "method",
        ["gradcam"],
        "Comma-separated saliency methods (sipak_jax.saliency.METHODS), e.g. gradcam,ig.",
    )
    flags.DEFINE_string("output_dir", None, "Where the overlays (and raw maps) go.")
    flags.DEFINE_bool("save_raw", False, "Also write <stem>.<method>.npy (H x W float32 raw map).")
    flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
    flags.DEFINE_string("target", None, "Class to explain (name or index); default: predicted.")
    flags.DEFINE_enum("score", "logit", ["logit", "probability"], "The score explained.")
    flags.DEFINE_integer("stage", 4, "ResNet stage (1..4) for the CAM family.")
    flags.DEFINE_string(
        "baseline",
        "background",
        "IG baseline: zeros, black, white, black_white, "
        "background (the slide colour around the cell) or blurred.",
    )
    flags.DEFINE_integer("ig_steps", 64, "Integrated Gradients steps.")
    flags.DEFINE_bool("average_transforms", False, "Average maps over the 8 rotations/flips.")
    flags.DEFINE_integer("batch_size", 8, "Images per batch.")


def collect_images(args: Sequence[str]) -> list[str]:
    """Files named directly plus the images directly inside named directories, in order."""
    paths = []
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(
                os.path.join(arg, n)
                for n in os.listdir(arg)
                if is_image_file(n) and os.path.isfile(os.path.join(arg, n))
            )
            if not found:
                raise ValueError(f"{arg}: no images ({', '.join(IMAGE_EXTENSIONS)}) inside")
            paths.extend(found)
        elif os.path.isfile(arg):
            paths.append(arg)
        else:
            raise FileNotFoundError(f"{arg}: no such image file or directory")
    if not paths:
        raise ValueError("no input images given")
    return paths


def plan_outputs(paths, methods, output_dir, save_raw, overwrite):
    """{(path, method): (png, npy or None)}; raises before any work on stem clashes, existing
    files (unless overwrite) or paths that would leave OUT."""
    out_root = os.path.realpath(output_dir)
    stems: dict[str, str] = {}
    plan = {}
    existing = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem in stems and os.path.realpath(stems[stem]) != os.path.realpath(p):
            raise ValueError(
                f"{stems[stem]} and {p} have the same stem {stem!r}: their outputs would clash; "
                "explain them into different --output_dir"
            )
        stems[stem] = p
        for m in methods:
            png = os.path.join(out_root, f"{stem}.{m}.png")
            npy = os.path.join(out_root, f"{stem}.{m}.npy") if save_raw else None
            for f in (png, npy):
                if f is None:
                    continue
                if os.path.dirname(os.path.realpath(f)) != out_root:
                    raise ValueError(f"{p}: output {f} would fall outside {out_root}")
                if os.path.lexists(f) and not overwrite:
                    existing.append(f)
            plan[(p, m)] = (png, npy)
    if existing:
        shown = "\n  ".join(existing[:10])
        more = f"\n  ... and {len(existing) - 10} more" if len(existing) > 10 else ""
        raise FileExistsError(
            f"{len(existing)} output file(s) already exist; not overwriting (use --overwrite):"
            f"\n  {shown}{more}"
        )
    return plan


def resolve_target(target: str | None, class_names: Sequence[str]):
    if target is None:
        return None
    if target in class_names:
        return list(class_names).index(target)
    try:
        idx = int(target)
    except ValueError:
        raise ValueError(
            f"--target={target!r} is neither a class name ({', '.join(class_names)}) nor an index"
        ) from None
    if not 0 <= idx < len(class_names):
        raise ValueError(f"--target={idx} out of range 0..{len(class_names) - 1}")
    return idx


def run(
    checkpoint,
    inputs,
    output_dir,
    methods=("gradcam",),
    *,
    save_raw=False,
    overwrite=False,
    target=None,
    score="logit",
    stage=4,
    baseline="background",
    ig_steps=64,
    average_transforms=False,
    batch_size=8,
    log=print,
) -> list[dict]:
    """Explain `inputs` with the model in `checkpoint`; returns one record per image."""
    from sipak_jax import ensemble, saliency

    unknown = [m for m in methods if m not in saliency.METHODS]
    if unknown:
        raise ValueError(f"unknown --method {unknown}; available: {sorted(saliency.METHODS)}")
    if output_dir is None:
        raise ValueError("--output_dir is required")
    paths = collect_images(inputs)
    os.makedirs(output_dir, exist_ok=True)
    plan = plan_outputs(paths, methods, output_dir, save_raw, overwrite)
    loaded = ensemble.load_members(checkpoint)
    _, model, meta = loaded[0]
    names = meta.class_names or [str(i) for i in range(model.num_classes)]
    options = {
        "target": resolve_target(target, names),
        "score": score,
        "stage": stage,
        "spec": meta.preprocessing,
        "average_transforms": average_transforms,
    }
    fns = [(saliency.ModelFunctions(m), mm) for _, m, mm in loaded]
    records = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        for m in methods:
            opts = {**options, **_method_options(m, ig_steps, baseline)}
            for rec in _explain_chunk(fns, chunk, m, opts, names, plan, overwrite):
                records.append(rec)
                log(_describe(rec))
    return records


def _method_options(method: str, ig_steps: int, baseline: str) -> dict:
    if method == "ig":
        return {"steps": ig_steps, "baseline": baseline}
    if method == "xrai":
        return {"ig_steps": ig_steps}
    return {}


def _member_maps(members, inputs_u8, method, opts):
    """(raw maps, normalised maps, targets, probabilities, info) of `method`: one member's own;
    for an ensemble the mean of the members' normalised maps of the ensemble's class."""
    from sipak_jax import calibration, preprocessing, saliency

    if len(members) == 1:
        fns = members[0][0]
        x = np.asarray(preprocessing.normalize(inputs_u8, opts["spec"]))
        probs = calibration.softmax(np.asarray(fns.logits(x)))
        res = saliency.explain(fns, x, method, **opts)
        return res.maps, res.normalized, res.target, probs, res.info
    xs = [np.asarray(preprocessing.normalize(inputs_u8, m.preprocessing)) for _, m in members]
    probs = np.mean(
        [
            calibration.softmax(np.asarray(fns.logits(x)), m.temperature)
            for (fns, m), x in zip(members, xs, strict=True)
        ],
        axis=0,
    )
    target = opts["target"]
    targets = np.full(len(probs), target) if target is not None else probs.argmax(1)
    results = [
        saliency.explain(fns, x, method, **{**opts, "target": targets, "spec": m.preprocessing})
        for (fns, m), x in zip(members, xs, strict=True)
    ]
    mean = np.mean([r.normalized for r in results], axis=0)
    info = {}
    if all("gap" in r.info for r in results):
        info["gap"] = np.mean([np.asarray(r.info["gap"]) for r in results], axis=0)
    return mean, mean, targets, probs, info


def _explain_chunk(members, paths, method, opts, names, plan, overwrite) -> list[dict]:
    """Maps of `method` for the images at `paths` (`members`: [(ModelFunctions, metadata)]):
    overlays (and raw maps) written where `plan` says; one record per image."""
    from sipak_jax import preprocessing
    from sipak_jax.saliency import overlay

    spec = opts["spec"]
    policy = spec.get("resize", preprocessing.DEFAULT_RESIZE)
    crops = [preprocessing.read_image(p) for p in paths]
    inputs_u8 = np.stack([preprocessing.preprocess_image(c, spec) for c in crops])
    raw, normalized, targets, probs, info = _member_maps(members, inputs_u8, method, opts)
    records = []
    for i, (p, crop) in enumerate(zip(paths, crops, strict=True)):
        png, npy = plan[(p, method)]
        norm = overlay.map_to_crop(normalized[i], crop.shape, policy)
        overlay.save_png(png, overlay.overlay(crop, norm), overwrite=overwrite)
        if npy is not None:
            _save_npy(npy, np.asarray(raw[i], np.float32), overwrite)
        t = int(targets[i])
        rec = {
            "file": p,
            "method": method,
            "predicted": names[int(np.argmax(probs[i]))],
            "target": names[t],
            "target_probability": float(probs[i, t]),
            "overlay": png,
        }
        if "gap" in info:
            rec["ig_completeness_gap"] = float(np.asarray(info["gap"])[i])
        records.append(rec)
    return records


def _describe(rec: dict) -> str:
    gap = rec.get("ig_completeness_gap")
    extra = f" IG gap {gap:.1%}" if gap is not None else ""
    return (
        f"{rec['file']}: {rec['method']} for {rec['target']} (p={rec['target_probability']:.3f}, "
        f"predicted {rec['predicted']}){extra} -> {rec['overlay']}"
    )


def _save_npy(path, array, overwrite):
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; not overwriting it")
    with open(path, "wb") as f:
        np.save(f, array)


def main(argv):
    from sipak_jax import console

    console.quiet_libraries(FLAGS.verbosity)
    inputs = argv[1:]
    if FLAGS.checkpoint is None or FLAGS.output_dir is None or not inputs:
        raise app.UsageError(
            "usage: python -m sipak_jax.explain --checkpoint=DIR --method=gradcam[,ig,...] "
            "--output_dir=OUT [--save_raw] IMAGE_OR_DIR..."
        )
    try:
        run(
            FLAGS.checkpoint,
            inputs,
            FLAGS.output_dir,
            FLAGS.method,
            save_raw=FLAGS.save_raw,
            overwrite=FLAGS.overwrite,
            target=FLAGS.target,
            score=FLAGS.score,
            stage=FLAGS.stage,
            baseline=FLAGS.baseline,
            ig_steps=FLAGS.ig_steps,
            average_transforms=FLAGS.average_transforms,
            batch_size=FLAGS.batch_size,
        )
    except (ValueError, FileNotFoundError, FileExistsError, console.UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
