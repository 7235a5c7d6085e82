"""Measure saliency methods over a test fold: sanity, faithfulness and localisation on cells.

    python -m sipak_jax.saliency_eval --checkpoint=DIR --data_dir=D --split=fold0 \
        --methods=gradcam,ig --output=OUT.json [--max_examples=200]

(or `--manual_dir=M` to read the SIPaKMeD folders directly). For each method, and for a random
map as the reference every real method must beat, it reports (see
`sipak_jax.saliency.metrics`): the share of positive saliency in the nucleus, perinuclear
ring, cytoplasm and background beside each region's area (the chance level) and the pointing
game, per class and overall; deletion and insertion AUC; ROAD (MoRF/LeRF); IG's completeness
gap; and the model-randomisation sanity check (Spearman correlation per randomised depth).
Examples whose contours are marked invalid are left out of localisation and counted. A model
with an attention head (`model.head='attention'`) always gets its own map measured too
('attention_head'); a ViT can be asked for attention rollout ('rollout').
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
RANDOM = "random"
ATTENTION = "attention_head"


def define_flags():
    """The command's flags (defined only when run as a command, so that importing this
    module beside other commands never clashes)."""
    flags.DEFINE_string("checkpoint", None, "Model DIR (training workdir or converted DIR).")
    flags.DEFINE_string("data_dir", None, "Built TFDS data dir (or use --manual_dir).")
    flags.DEFINE_string("manual_dir", None, "SIPaKMeD folders read directly (no TFDS).")
    flags.DEFINE_string("config", "grouped", "Dataset config: grouped or random_cells.")
    flags.DEFINE_string("split", "fold0", "The test fold.")
    flags.DEFINE_list("methods", ["gradcam", "ig"], "Saliency methods to measure.")
    flags.DEFINE_string("output", None, "JSON file for the results (never overwritten).")
    flags.DEFINE_integer("max_examples", 0, "Use at most this many examples (0: all).")
    flags.DEFINE_integer("sanity_examples", 8, "Examples for the randomisation sanity check.")
    flags.DEFINE_integer("road_examples", 32, "Examples for ROAD (a sparse solve per image).")
    flags.DEFINE_integer("ig_steps", 64, "Integrated Gradients steps.")
    flags.DEFINE_string("baseline", "background", "IG baseline.")
    flags.DEFINE_integer("batch_size", 8, "Images per batch.")
    flags.DEFINE_integer("seed", 0, "Seed of the random reference map and of the noise.")


def _method_options(method, ig_steps, baseline):
    if method == "ig":
        return {"steps": ig_steps, "baseline": baseline}
    if method == "xrai":
        return {"ig_steps": ig_steps}
    return {}


def _batches(n: int, batch_size: int):
    return [slice(i, i + batch_size) for i in range(0, n, batch_size)]


def _maps_for(fns, x, method, pred, spec, opts, batch_size, rng):
    """(maps [N,S,S], info) of `method` for the predicted classes; the random reference map
    for `RANDOM`. IG's completeness gap is summarised in `info`."""
    if method == RANDOM:
        return rng.uniform(size=x.shape[:3]).astype(np.float32), {}
    from sipak_jax import saliency

    parts, gaps = [], []
    for b in _batches(len(x), batch_size):
        r = saliency.explain(fns, x[b], method, target=pred[b], spec=spec, **opts)
        parts.append(r.maps)
        if "gap" in r.info:
            gaps.append(np.asarray(r.info["gap"]))
    info = {}
    if gaps:
        g = np.concatenate(gaps)
        info["ig_completeness_gap"] = {
            "median": float(np.median(g)),
            "max": float(np.max(g)),
            "share_within_5pct": float(np.mean(g <= 0.05)),
        }
    return np.concatenate(parts), info


def _faithfulness(fns, x, maps, pred, batch_size, road_examples, seed) -> dict:
    """Deletion / insertion AUC over every example; ROAD on the first `road_examples`."""
    from sipak_jax.saliency import metrics

    deletion, insertion = [], []
    for b in _batches(len(x), batch_size):
        r = metrics.deletion_insertion(fns, x[b], maps[b], pred[b])
        deletion.append(r["deletion"])
        insertion.append(r["insertion"])
    out = {
        "deletion_auc": float(np.mean(np.concatenate(deletion))),
        "insertion_auc": float(np.mean(np.concatenate(insertion))),
    }
    k = min(len(x), road_examples)
    if k:
        ro = metrics.road(fns, x[:k], maps[:k], pred[:k], seed=seed)
        out["road_morf"] = float(ro["morf"].mean())
        out["road_lerf"] = float(ro["lerf"].mean())
    return out


def _log_method(log, method: str, out: dict) -> None:
    a = out["localisation"].get("all", {})
    if a:
        log(
            f"{method}: nucleus share {a['nucleus']['share']:.3f} (chance "
            f"{a['nucleus']['chance']:.3f}), pointing {a['nucleus']['pointing']:.2f}; "
            f"deletion {out['deletion_auc']:.3f} insertion {out['insertion_auc']:.3f} "
            f"({out['seconds']} s)"
        )


def _regions(i, nuc_xy, cyt_xy, crop_shapes, nuc_masks, cyt_masks, size, policy):
    """Example `i`'s localisation regions: from its masks when it has them, else from its
    contours; None when it has neither."""
    from sipak_jax.saliency import metrics

    if nuc_masks is not None and nuc_masks[i] is not None:
        return metrics.mask_regions(nuc_masks[i], cyt_masks[i], size, policy)
    if nuc_xy is None or len(nuc_xy[i]) < 3:
        return None
    return metrics.cell_masks(nuc_xy[i], cyt_xy[i], crop_shapes[i], size, policy)


def _all_regions(valid, contours, masks, size: int, policy: str) -> list:
    """Each example's regions (`_regions`), None where it is not `valid`."""
    return [
        _regions(i, *contours, *masks, size, policy) if v else None for i, v in enumerate(valid)
    ]


def evaluate(
    model,
    spec,
    images_u8,
    labels,
    crop_shapes,
    nucleus_contours,
    cytoplasm_contours,
    valid,
    class_names,
    methods=("gradcam", "ig"),
    *,
    ig_steps=64,
    baseline="background",
    batch_size=8,
    sanity_examples=8,
    road_examples=32,
    seed=0,
    log=print,
    nucleus_masks=None,
    cytoplasm_masks=None,
) -> dict:
    """All metrics for `methods` (plus the random reference map) on prepared examples:
    `images_u8` [N,S,S,3] network inputs, their crop shapes and crop-level contours, or
    crop-level bool masks (`nucleus_masks` / `cytoplasm_masks`, e.g. Herlev's) used instead
    of the contours wherever an example has one. Examples that are not `valid`, or have
    neither a mask nor a nucleus contour, are left out of localisation and counted."""
    from sipak_jax import preprocessing, saliency
    from sipak_jax.saliency import metrics

    fns = saliency.ModelFunctions(model)
    x = np.asarray(preprocessing.normalize(images_u8, spec))
    n, size = x.shape[0], x.shape[1]
    policy = spec.get("resize", preprocessing.DEFAULT_RESIZE)
    labels = np.asarray(labels)
    pred = np.concatenate([np.asarray(fns.predict(x[b])) for b in _batches(n, batch_size)])
    contours = (nucleus_contours, cytoplasm_contours, crop_shapes)
    masks = _all_regions(valid, contours, (nucleus_masks, cytoplasm_masks), size, policy)
    loc_idx = [i for i in range(n) if masks[i] is not None]
    rng = np.random.default_rng(seed)
    results = {
        "examples": int(n),
        "accuracy": float(np.mean(pred == labels)),
        "invalid_annotations_skipped": int(sum(m is None for m in masks)),
        "methods": {},
    }
    for method in [*methods, RANDOM]:
        t0 = time.time()
        opts = _method_options(method, ig_steps, baseline)
        maps, info = _maps_for(fns, x, method, pred, spec, opts, batch_size, rng)
        loc = [metrics.localisation(maps[i], masks[i]) for i in loc_idx]
        out = {"localisation": metrics.summarize_localisation(loc, labels[loc_idx], class_names)}
        out.update(_faithfulness(fns, x, maps, pred, batch_size, road_examples, seed))
        if method != RANDOM and sanity_examples:
            k = min(n, sanity_examples)
            rho = metrics.randomization_sanity(
                fns, x[:k], method, target=pred[:k], **opts, spec=spec
            )
            out["randomization_spearman"] = {lvl: float(v.mean()) for lvl, v in rho.items()}
        out.update(info)
        out["seconds"] = round(time.time() - t0, 1)
        results["methods"][method] = out
        _log_method(log, method, out)
    return results


def with_attention_head(methods, model) -> list[str]:
    """`methods`, plus the attention head's own map ('attention_head') when the model has an
    attention head: its map is measured beside the others whenever it exists."""
    methods = list(methods)
    if getattr(model, "attention_pool", None) is not None and ATTENTION not in methods:
        methods.append(ATTENTION)
    return methods


def _masks(cache, name: str, n: int):
    """The cache's crop-level masks `name` (Herlev), or None when the dataset has none."""
    masks = getattr(cache, name, None)
    return None if masks is None else masks[:n]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.checkpoint is None or FLAGS.output is None:
        raise app.UsageError("--checkpoint and --output are required")
    if os.path.exists(FLAGS.output):
        print(f"error: {FLAGS.output} exists; not overwriting it", file=sys.stderr)
        return 2
    from sipak_jax import input_pipeline, model_io, saliency

    unknown = [m for m in FLAGS.methods if m not in saliency.METHODS]
    if unknown:
        print(
            f"error: unknown --methods {unknown}; available {sorted(saliency.METHODS)}",
            file=sys.stderr,
        )
        return 2
    model, meta = model_io.load_model_dir(FLAGS.checkpoint)
    spec = meta.preprocessing
    cache = input_pipeline.load_splits(
        FLAGS.data_dir,
        FLAGS.config,
        (FLAGS.split,),
        int(spec["image_size"]),
        spec.get("resize", "pad"),
        manual_dir=FLAGS.manual_dir,
    )
    n = len(cache.label) if not FLAGS.max_examples else min(FLAGS.max_examples, len(cache.label))
    results = evaluate(
        model,
        spec,
        cache.image[:n],
        cache.label[:n],
        cache.crop_shape[:n],
        cache.nucleus_contour[:n],
        cache.cytoplasm_contour[:n],
        cache.annotation_valid[:n],
        meta.class_names or [str(i) for i in range(model.num_classes)],
        with_attention_head(FLAGS.methods, model),
        ig_steps=FLAGS.ig_steps,
        baseline=FLAGS.baseline,
        batch_size=FLAGS.batch_size,
        sanity_examples=FLAGS.sanity_examples,
        road_examples=FLAGS.road_examples,
        seed=FLAGS.seed,
        nucleus_masks=_masks(cache, "nucleus_mask", n),
        cytoplasm_masks=_masks(cache, "cytoplasm_mask", n),
    )
    results.update(checkpoint=FLAGS.checkpoint, split=FLAGS.split, config=FLAGS.config)
    with open(FLAGS.output, "x") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {FLAGS.output}")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
