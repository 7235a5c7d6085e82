"""Converts ImageNet weights from Keras, torchvision or timm files into a model DIR.

    python -m sipak_jax.convert --source=keras|torchvision|timm [--arch=NAME] --input=FILE
        --output=DIR [--download] [--overwrite] [--cache_dir=DIR]

``--arch`` takes the source library's own model name: torchvision ``resnet50``,
``convnext_tiny``; timm ``convnext_tiny``; Keras ``resnet50`` (``known_archs()`` lists them).
Without it a file is a ResNet (Keras or torchvision), as before ``--arch`` existed. The
families other than ResNet have their mappings in ``sipak_jax.conversions.<family>`` (timm
files: ``.safetensors`` or ``.bin``, a torch pickle read with ``weights_only=True``); the rest
of this docstring describes the ResNet path.

Reads, without the source framework where possible:

- Keras applications' legacy HDF5 weight files
  (``resnet{50,101,152}_weights_tf_dim_ordering_tf_kernels[_notop].h5``) with h5py: one group
  per layer, its ``weight_names`` attribute listing the datasets (``conv1_conv/kernel:0``,
  ``conv1_bn/gamma:0``, ...), as the official files and Keras's own legacy writer
  (``model.save("x.h5")``) lay them out. No TensorFlow is imported. The Keras 3
  ``.weights.h5`` layout names layers by class (``conv2d_3``) and is refused.
- torchvision state dicts: ``.pth`` through ``torch.load(..., weights_only=True)`` (a pickle
  that would build arbitrary objects or run code is refused before anything runs) or
  ``.safetensors`` (no torch needed).

The architecture (bottleneck or basic blocks, blocks per stage, stem width, classes) is read
from the tensors' names and shapes; the variant from the source (Keras: ``v1``, torchvision:
``v1.5``). The merge is strict: every tensor of the file lands in exactly one parameter or
BatchNorm statistic with the right shape, except torchvision's ``num_batches_tracked``
counters (NNX BatchNorm keeps no counter; they are listed in the log); anything unmatched,
missing or mis-shaped is an error listing all of them.

The DIR gets ``metadata.json`` (a ``model_io.ModelMetadata``, docs/architecture.md) whose
taxonomy, when a top was converted, holds the classes (for 1000 classes the ImageNet names of
``sipak_jax.models.imagenet_classes``, the same order in both frameworks, dataset
"imagenet", no abnormal classes, no readings; a headless file has none), and the
preprocessing the weights expect:

- Keras ("caffe"): BGR, mean [103.939, 116.779, 123.68] subtracted, no scaling;
- torchvision: RGB, (x/255 - mean) / std with the ImageNet mean/std.

Both at 224x224 with ``resize="stretch"``: the project's resize policies are ``pad`` and
``stretch``; torchvision's own evaluation transform (shorter side to 256, or 232 for the
IMAGENET1K_V2 files, then a 224 centre crop) is recorded in ``source.eval_transform`` for
reference but is not what ``sipak_jax.preprocessing`` does.

``--download`` fetches an official file by its name from its published address into the
cache (``--cache_dir``, default ``$SIPAK_JAX_WEIGHTS_CACHE`` or
``~/.cache/sipak_jax/weights``) and checks its published hash (Keras: the MD5 in
``keras.applications.resnet``; torchvision: the SHA-256 prefix in the file name). A file
with an official name is always checked against that hash.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import urllib.request
from collections.abc import Mapping

import numpy as np

from sipak_jax import fileio
from sipak_jax.conversions import ConversionError, find, known_archs

KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
TORCHVISION_URL = "https://download.pytorch.org/models/"

# Official Keras files -> MD5 (keras/src/applications/resnet.py WEIGHTS_HASHES).
KERAS_FILES = {
    "resnet50_weights_tf_dim_ordering_tf_kernels.h5": "2cb95161c43110f7111970584f804107",
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101_weights_tf_dim_ordering_tf_kernels.h5": "f1aeb4b969a6efcfb50fad2f0c20cfc5",
    "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152_weights_tf_dim_ordering_tf_kernels.h5": "100835be76be38e30d865e96f2aaae62",
    "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5": "ee4c566cf9a93f14d82f913c2dc6dd0c",
}
# Official torchvision files -> the resize of their evaluation transform (before the 224 crop).
# The hex in each name is the prefix of the file's SHA-256.
TORCHVISION_FILES = {
    "resnet18-f37072fd.pth": 256,
    "resnet34-b627a593.pth": 256,
    "resnet50-0676ba61.pth": 256,  # IMAGENET1K_V1
    "resnet50-11ad3fa6.pth": 232,  # IMAGENET1K_V2
    "resnet101-63fe2227.pth": 256,
    "resnet101-cd907fc2.pth": 232,
    "resnet152-394f9c45.pth": 256,
    "resnet152-f82ba261.pth": 232,
    "convnext_tiny-983f1562.pth": 236,  # ConvNeXt_*_Weights.IMAGENET1K_V1
    "convnext_small-0c510722.pth": 230,
    "convnext_base-6075fbad.pth": 232,
    "convnext_large-ea097f82.pth": 232,
}
SOURCES = ("keras", "torchvision", "timm")
# --arch names of the ResNets (the source library's names) -> depth.
RESNET_ARCHS = {
    **{("torchvision", f"resnet{d}"): d for d in (18, 34, 50, 101, 152)},
    **{("keras", f"resnet{d}"): d for d in (50, 101, 152)},
}
_EXTENSIONS = {
    "keras": (".h5",),
    "torchvision": (".pth", ".pt", ".safetensors"),
    "timm": (".safetensors", ".bin", ".pth"),
}
VARIANT = {"keras": "v1", "torchvision": "v1.5"}
# torchvision tensors that have no counterpart in an NNX model, dropped by rule (and logged).
_TORCH_DROPPED = re.compile(r".*\.num_batches_tracked$")


# ---------------------------------------------------------------------------------------------
# Reading the files.


def read_keras_h5(path: str) -> dict[str, np.ndarray]:
    """{'layer/weight': array} from a Keras HDF5 weights file (legacy or Keras 3 layout)."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConversionError(f"{path} is not a readable HDF5 file: {e}") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f  # a whole-model .h5
        if "layer_names" in root.attrs or "layer_names0" in root.attrs:
            return _read_legacy_h5(root, path)
        if "layers" in root and "vars" in root:
            raise ConversionError(
                f"{path} is a Keras 3 `.weights.h5` file: it names layers by class "
                "(`conv2d_3`), not by the ResNet's layer names, so it cannot be mapped safely. "
                "Save the legacy layout instead (`model.save('model.h5')`, or "
                "`keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group`) or use "
                "the official Keras applications file."
            )
        raise ConversionError(
            f"{path}: no 'layer_names' attribute: not a Keras legacy HDF5 weights file."
        )


def _decode(x) -> str:
    return x.decode("utf8") if isinstance(x, bytes) else str(x)


def _h5_attr_list(group, name) -> list[str]:
    """A list attribute, also when Keras split it into ``name0``, ``name1``... (large lists)."""
    if name in group.attrs:
        return [_decode(x) for x in group.attrs[name]]
    out, i = [], 0
    while f"{name}{i}" in group.attrs:
        out.extend(_decode(x) for x in group.attrs[f"{name}{i}"])
        i += 1
    return out


def _read_legacy_h5(root, path) -> dict[str, np.ndarray]:
    out = {}
    # Keras 3's legacy writer adds the model's own (non-layer) variables here; a ResNet has
    # none, and any found would otherwise be silently left behind.
    extra = root.get("top_level_model_weights")
    if extra is not None and _h5_attr_list(extra, "weight_names"):
        raise ConversionError(
            f"{path}: 'top_level_model_weights' holds {_h5_attr_list(extra, 'weight_names')}: "
            "not a plain ResNet."
        )
    for layer in _h5_attr_list(root, "layer_names"):
        group = root[layer]
        for wname in _h5_attr_list(group, "weight_names"):
            short = wname.split("/")[-1].split(":")[0]
            key = f"{layer}/{short}"
            if key in out:
                raise ConversionError(f"{path}: weight {key} appears twice.")
            out[key] = np.asarray(group[wname][()])
    if not out:
        raise ConversionError(f"{path}: the file lists layers but holds no weights.")
    return out


def read_torchvision(path: str) -> dict[str, np.ndarray]:
    """{'layer1.0.conv1.weight': array} from a ``.safetensors`` or ``.pth`` state dict.

    ``.pth`` goes through ``torch.load(weights_only=True)``: only tensors and plain
    containers are unpickled; anything else is refused before it can run."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return {k: np.asarray(v) for k, v in load_file(path).items()}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ConversionError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"Reading {path} needs PyTorch (`pip install torch`); or convert the state dict to "
            ".safetensors elsewhere and pass that file."
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
        raise ConversionError(
            f"Refused to load {path}: it is not a plain tensor state dict that "
            f"torch.load(weights_only=True) accepts ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Nothing in it was run. Use the "
            "official torchvision file or a .safetensors export."
        ) from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{path} holds a {type(sd).__name__}, not a state dict.")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor.")
        v = v.detach().cpu()
        out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out


# ---------------------------------------------------------------------------------------------
# Architecture from the tensors.


def _arch(source: str, tensors: Mapping[str, np.ndarray], path: str) -> dict:
    """The model config (depth, variant, num_classes, width[, stage_sizes]) a file holds."""
    from sipak_jax.models.resnet import DEPTHS

    if source == "torchvision":
        pat, stem, head = r"layer([1-4])\.(\d+)\.", "conv1.weight", "fc.weight"
        bottleneck = any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in tensors)
    else:
        pat, stem, head = r"conv([2-5])_block(\d+)_", "conv1_conv/kernel", "predictions/kernel"
        bottleneck = any(re.match(r"conv\d_block\d+_3_conv/", k) for k in tensors)
    blocks = [set(), set(), set(), set()]
    for k in tensors:
        m = re.match(pat, k)
        if m:
            offset = 1 if source == "torchvision" else 2
            blocks[int(m.group(1)) - offset].add(int(m.group(2)))
    sizes = tuple(len(b) for b in blocks)
    if stem not in tensors or min(sizes) == 0:
        raise ConversionError(
            f"{path}: not a {source} ResNet (no {stem!r} or a stage without blocks; "
            f"blocks per stage found: {sizes}). Another architecture needs --arch (the "
            f"library's model name, e.g. convnext_tiny): python -m sipak_jax.convert "
            f"--source={source} --arch=NAME --input={path} --output=DIR."
        )
    kind = "bottleneck" if bottleneck else "basic"
    width = tensors[stem].shape[0 if source == "torchvision" else -1]
    cfg = {"variant": VARIANT[source], "width": int(width)}
    cfg["num_classes"] = (
        int(tensors[head].shape[0 if source == "torchvision" else 1]) if head in tensors else 0
    )
    for depth, (k, s) in DEPTHS.items():
        if k == kind and s == sizes:
            cfg["depth"] = depth
            break
    else:  # a non-standard stack (tests use tiny ones): keep the block kind, override sizes
        cfg["depth"] = 50 if kind == "bottleneck" else 18
        cfg["stage_sizes"] = list(sizes)
    return cfg


# ---------------------------------------------------------------------------------------------
# Name mapping: model path -> (source key, transform).


def _torch_key(parts: list[str]) -> tuple[str, str]:
    *mod, leaf = parts
    names = []
    for p in mod:
        names.append({"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(p, p))
    module = ".".join(names)
    if leaf == "kernel":
        return f"{module}.weight", ("linear" if module == "fc" else "conv")
    table = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    return f"{module}.{table[leaf]}", "none"


def _keras_key(parts: list[str]) -> tuple[str, str]:
    *mod, leaf = parts
    if mod == ["fc"]:
        layer = "predictions"
    elif mod == ["conv1"]:
        layer = "conv1_conv"
    elif mod == ["bn1"]:
        layer = "conv1_bn"
    else:
        stage, block, name = mod
        stage_i, block_i = int(stage[len("layer") :]), int(block)
        m = re.fullmatch(r"(conv|bn)(\d)", name)
        kind, k = (m.group(1), m.group(2)) if m else (name.split("_")[1], "0")
        layer = f"conv{stage_i + 1}_block{block_i + 1}_{k}_{kind}"
    is_bn = layer.endswith("_bn")
    if is_bn:
        table = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
        return f"{layer}/{table[leaf]}", "none"
    return f"{layer}/{leaf}", "none"  # Keras kernels are already HWIO / [in, out]


def _transform(x: np.ndarray, how: str) -> np.ndarray:
    if how == "conv":  # torch [O, I, kh, kw] -> [kh, kw, I, O]
        return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x
    if how == "linear":  # torch [out, in] -> [in, out]
        return x.T if x.ndim == 2 else x
    return x


def to_model_state(source: str, tensors: Mapping[str, np.ndarray], model, path: str) -> dict:
    """Flat {'model/path': array} for ``model`` from a file's tensors, strictly: raises a
    ConversionError listing every file tensor with no place, every model tensor the file
    lacks and every shape mismatch."""
    from sipak_jax import model_io

    target = model_io.flatten(model_io.weights_state(model))
    keyfn = _torch_key if source == "torchvision" else _keras_key
    used, out, missing, misshaped = set(), {}, [], []
    for mpath, leaf in target.items():
        key, how = keyfn(mpath.split("/"))
        if key not in tensors:
            missing.append(f"{key} (for {mpath} {tuple(leaf.shape)})")
            continue
        used.add(key)
        value = _transform(np.asarray(tensors[key]), how)
        if tuple(value.shape) != tuple(leaf.shape):
            misshaped.append(f"{key} {tuple(tensors[key].shape)} -> {mpath} {tuple(leaf.shape)}")
            continue
        out[mpath] = value.astype(np.float32)
    dropped = [
        k for k in tensors if k not in used and source == "torchvision" and _TORCH_DROPPED.match(k)
    ]
    unmatched = [
        f"{k} {tuple(np.shape(tensors[k]))}" for k in tensors if k not in used and k not in dropped
    ]
    if missing or unmatched or misshaped:
        raise ConversionError(
            f"{path} does not convert one to one into ResNet {model.config()}:\n"
            + model_io.mismatch_listing(
                ("tensors of the file with no place in the model", unmatched),
                ("tensors the model needs, missing from the file", missing),
                ("tensors with the wrong shape", misshaped),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Files: official names, hashes, download.


def file_digest(path: str, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def official_url(name: str) -> str | None:
    """The published address of an official weights file name, or None."""
    if name in KERAS_FILES:
        return KERAS_URL + name
    if name in TORCHVISION_FILES:
        return TORCHVISION_URL + name
    return None


def check_official_hash(path: str) -> None:
    """Raises if ``path`` has an official file name but not that file's published hash."""
    name = os.path.basename(path)
    if name in KERAS_FILES:
        got, want, algo = file_digest(path, "md5"), KERAS_FILES[name], "MD5"
        ok = got == want
    elif name in TORCHVISION_FILES:
        want = name.rsplit("-", 1)[1].split(".")[0]
        got, algo = file_digest(path, "sha256"), "SHA-256"
        ok = got.startswith(want)
    else:
        return
    if not ok:
        raise ConversionError(
            f"{path} has the {algo} {got}, but the official {name} has {want}...: the file is "
            "truncated, corrupted or not the official one. Delete it and download it again "
            f"from {official_url(name)} (or pass --download)."
        )


def default_cache_dir() -> str:
    return os.environ.get("SIPAK_JAX_WEIGHTS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sipak_jax", "weights"
    )


def _fetch(url: str, dest: str) -> None:
    """Downloads ``url`` to ``dest`` atomically (a failed download leaves nothing)."""
    with fileio.atomic_path(dest) as tmp, open(tmp, "wb") as out:
        with urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)


def resolve_input(path: str, *, download: bool = False, cache_dir: str | None = None) -> str:
    """The local file to convert: ``path`` itself if it exists, else (for an official file
    name) the cached copy, else a download when ``download`` is set."""
    if os.path.isfile(path):
        check_official_hash(path)
        return path
    name = os.path.basename(path)
    url = official_url(name)
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, name)
    if url is None:
        raise FileNotFoundError(
            f"{path} not found, and {name!r} is not an official file name this command can "
            f"download (Keras: {', '.join(KERAS_FILES)}; torchvision: "
            f"{', '.join(TORCHVISION_FILES)})."
        )
    if os.path.isfile(cached):
        check_official_hash(cached)
        return cached
    if not download:
        raise FileNotFoundError(
            f"{path} not found. Download {url} and put it at {path} (or at {cached}), or pass "
            "--download to fetch it into the cache."
        )
    try:
        _fetch(url, cached)
    except OSError as e:
        raise ConnectionError(
            f"Could not download {url} ({e}). Offline? Download it elsewhere and put it at "
            f"{cached} (or pass its path as --input)."
        ) from None
    check_official_hash(cached)
    return cached


# ---------------------------------------------------------------------------------------------
# Conversion.


def guess_source(path: str) -> str:
    if path.endswith(".h5"):
        return "keras"
    if path.endswith((".pth", ".pt", ".safetensors")):
        return "torchvision"
    raise ConversionError(
        f"Cannot tell the source of {path} from its extension (.h5: keras; .pth, .pt, "
        ".safetensors: torchvision); pass --source."
    )


def _check_source(path: str, source: str, arch: str | None) -> None:
    if source not in SOURCES:
        raise ConversionError(f"--source must be one of {SOURCES}, got {source!r}.")
    if not path.endswith(_EXTENSIONS[source]):
        raise ConversionError(
            f"{path}: {source} weights are read from {' or '.join(_EXTENSIONS[source])} files."
        )
    if arch is None and source == "timm":
        raise ConversionError(
            f"{path}: timm files need --arch (the timm model name, one of "
            f"{[a for s, a in known_archs() if s == 'timm']})."
        )
    if arch is not None and (source, arch) not in RESNET_ARCHS and find(source, arch) is None:
        names = sorted({a for s, a in [*RESNET_ARCHS, *known_archs()] if s == source})
        raise ConversionError(f"--arch={arch} is not a {source} architecture we convert: {names}.")


def official_arch(name: str) -> str | None:
    """The --arch of an official torchvision file of another family than ResNet
    (``convnext_tiny-983f1562.pth`` -> ``convnext_tiny``), else None."""
    name = os.path.basename(name)
    if name not in TORCHVISION_FILES:
        return None
    arch = name.rsplit("-", 1)[0]
    return arch if find("torchvision", arch) is not None else None


def convert_file(path: str, source: str | None = None, arch: str | None = None):
    """Reads a weights file and returns (model with its weights, `model_io.ModelMetadata`).
    ``arch`` (the source library's model name) picks the family; None: the one of an official
    file name (``official_arch``), else a ResNet."""
    source = source or guess_source(path)
    if arch is None and source == "torchvision":
        arch = official_arch(path)
    _check_source(path, source, arch)
    tensors = read_keras_h5(path) if source == "keras" else read_torchvision(path)
    if arch is None or (source, arch) in RESNET_ARCHS:
        return _convert_resnet(source, arch, tensors, path)
    return _convert_family(find(source, arch), source, arch, tensors, path)


def _convert_resnet(source: str, arch: str | None, tensors, path: str):
    import jax.numpy as jnp

    from sipak_jax import model_io

    cfg = _arch(source, tensors, path)
    if arch is not None and cfg["depth"] != RESNET_ARCHS[(source, arch)]:
        raise ConversionError(
            f"{path} holds a ResNet-{cfg['depth']} {cfg.get('stage_sizes', '')}, not {arch}."
        )
    model = model_io.abstract_model(cfg, dtype=jnp.float32)
    flat = to_model_state(source, tensors, model, path)
    model = model_io.model_with_weights(cfg, flat, what=f"file {path}")
    model.eval()
    return model, _metadata(source, cfg, path, tensors)


def _convert_family(module, source: str, arch: str, tensors, path: str):
    """A model of another family (``sipak_jax.conversions``) from the file's tensors."""
    import jax.numpy as jnp

    from sipak_jax import model_io, preprocessing

    if hasattr(module, "model_config"):
        cfg = module.model_config(source, arch, tensors, path)
    else:
        cfg = dict(module.ARCHS[(source, arch)])
    model = model_io.abstract_model(cfg, dtype=jnp.float32)
    flat = module.to_state(source, tensors, model)
    model = model_io.model_with_weights(cfg, flat, what=f"file {path}")
    model.eval()
    if hasattr(module, "preprocessing"):
        spec = module.preprocessing(source, arch)
    else:
        spec = preprocessing.spec_for("torchvision", image_size=224, resize="stretch")
    transform = module.eval_transform(source, arch) if hasattr(module, "eval_transform") else ""
    meta = _metadata(source, cfg, path, tensors, spec=spec, eval_transform=transform)
    meta.source["arch"] = arch
    return model, meta.validate()


def _metadata(source: str, cfg: dict, path: str, tensors: Mapping, spec=None, eval_transform=""):
    """The converted DIR's metadata: ImageNet classes (a bare taxonomy, dataset "imagenet")
    for a 1000-class top, `class_<i>` for another top, none for a headless model."""
    from sipak_jax import model_io, preprocessing
    from sipak_jax.models.imagenet_classes import IMAGENET_CLASS_NAMES
    from tfds_sipakmed.taxonomy import Taxonomy

    name = os.path.basename(path)
    src = {"framework": source, "file": name, "sha256": file_digest(path)}
    if official_url(name):
        src["url"] = official_url(name)
    if eval_transform:
        src["eval_transform"] = eval_transform
    elif source == "torchvision":
        resize = TORCHVISION_FILES.get(name, 256)
        src["eval_transform"] = f"resize shorter side to {resize}, centre crop 224"
    else:
        src["eval_transform"] = "resize to 224x224"
    dropped = sorted(k for k in tensors if _TORCH_DROPPED.match(k))
    if source != "keras" and dropped:
        src["dropped"] = f"{len(dropped)} num_batches_tracked counters"
    n = cfg["num_classes"]
    if n == len(IMAGENET_CLASS_NAMES):
        taxonomy = Taxonomy.bare(IMAGENET_CLASS_NAMES, dataset="imagenet")
    else:
        taxonomy = Taxonomy.bare([f"class_{i}" for i in range(n)]) if n else None
    if spec is None:
        spec = preprocessing.spec_for(source, image_size=224, resize="stretch")
    return model_io.ModelMetadata(
        kind="converted", model=cfg, taxonomy=taxonomy, preprocessing=spec, source=src
    ).validate()


def convert(
    source: str,
    input_path: str,
    output_dir: str,
    *,
    download: bool = False,
    overwrite: bool = False,
    cache_dir: str | None = None,
    arch: str | None = None,
) -> dict:
    """Converts ``input_path`` (or the official file of that name) into ``output_dir``;
    returns the metadata written. ``arch``: the source library's model name (None: ResNet)."""
    from sipak_jax import model_io

    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(
            f"{output_dir} is not empty; choose a new output directory or pass --overwrite."
        )
    path = resolve_input(input_path, download=download, cache_dir=cache_dir)
    model, meta = convert_file(path, source, arch)
    model_io.save_model_dir(output_dir, model, meta, overwrite=overwrite)
    return model_io.read_metadata(output_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sipak_jax.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument(
        "--arch", default=None, help="the source library's model name (default: a ResNet)"
    )
    parser.add_argument("--input", required=True, help="weights file, or an official file name")
    parser.add_argument("--output", required=True, help="model DIR to write (must be empty)")
    parser.add_argument("--download", action="store_true", help="fetch official files")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    parser.add_argument("--cache_dir", default=None, help=f"default {default_cache_dir()}")
    args = parser.parse_args(argv)
    try:
        meta = convert(
            args.source,
            args.input,
            args.output,
            download=args.download,
            overwrite=args.overwrite,
            cache_dir=args.cache_dir,
            arch=args.arch,
        )
    except (ConversionError, FileNotFoundError, FileExistsError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from sipak_jax.models import registry

    print(
        f"Wrote {args.output}: {registry.describe(meta.model)}, {meta.model['num_classes']} "
        f"classes, from {meta.source['file']} ({args.source})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
