"""Training initialisation from pretrained weights: `init_from(model, source)`.

`source` is a model DIR (a converted-weights DIR, or a training workdir: its best step, as
`sipak_jax.model_io.load_model_dir` picks it) or a raw weights file (Keras `.h5`, torchvision
`.pth` / `.safetensors`, or an official file name found in the weights cache), converted on the
fly by `sipak_jax.convert`. Everything but the head loads strictly (`model_io.merge_weights`);
the head stays as the new model built it.

This module sits above both (pretrained -> convert -> model_io): `model_io` never imports
`convert`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from flax import nnx

from sipak_jax import model_io
from sipak_jax.models import registry


def load_weights(source: str | os.PathLike, sharding=None) -> tuple[dict, model_io.ModelMetadata]:
    """(flat {'path': array} of the weights, their metadata) from a model DIR or a raw
    weights file (`.h5` Keras, `.pth` / `.safetensors` torchvision)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        meta = model_io.read_metadata(source)
        ckpt, _, _ = model_io.weights_dir(source, meta)
        return model_io.flatten(model_io.restore_arrays(ckpt, sharding)), meta
    from sipak_jax import convert  # h5py / torch only when a raw file is given

    model, meta = convert.convert_file(convert.resolve_input(source))
    return model_io.flatten(model_io.weights_state(model)), meta


# Model-config fields a pretrained source may differ in: the head is the model's own (a new
# `fc`, an attention pool the source may lack), and a ViT's position embeddings are resampled
# to the model's image size (`conversions.vit.resample_state`, as timm / torchvision do).
_MAY_DIFFER = ("num_classes", "head", "image_size")


def init_from(
    model: nnx.Module,
    source: str | os.PathLike,
    *,
    keep: Iterable[str] = ("fc/.*", "attention_pool/.*"),
) -> dict:
    """Loads the backbone and BatchNorm statistics of `source` (model DIR or weights file)
    into `model`, keeping its head (paths matching `keep` regexes, default the `fc` layer and
    the attention pool). Strict about everything else; the source's architecture (family, and
    every field of its model config but ``_MAY_DIFFER``'s) must equal the model's. Returns
    {"source", "loaded", "kept", "metadata"} for the log."""
    flat, meta = load_weights(source)
    theirs, mine = dict(meta.model), registry.config_of(model)
    if registry.family(theirs) != registry.family(mine):
        raise model_io.WeightMismatchError(
            f"{source} holds a {registry.describe(theirs)}, the model is a "
            f"{registry.describe(mine)}; set config.model.name={registry.family(theirs)!r}."
        )
    for key in sorted((set(theirs) | set(mine)) - set(_MAY_DIFFER)):
        if theirs.get(key) != mine.get(key):
            raise model_io.WeightMismatchError(
                f"{source} holds a {registry.describe(theirs)} with {key}={theirs.get(key)!r}, "
                f"the model has {key}={mine.get(key)!r}; build the model with "
                f"{key}={theirs.get(key)!r}."
            )
    if theirs.get("image_size") != mine.get("image_size"):
        from sipak_jax.conversions import vit

        framework = (meta.source or {}).get("framework", "timm")
        flat = vit.resample_state(flat, model.grid, framework)
    kept = model_io.merge_weights(model, flat, dont_load=keep, what=f"weights {source}")
    loaded = len(model_io.flatten(model_io.weights_state(model))) - len(kept)
    return {"source": os.fspath(source), "loaded": loaded, "kept": kept, "metadata": meta}
