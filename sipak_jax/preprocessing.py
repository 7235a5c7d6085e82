"""Preprocessing shared by training, evaluation, prediction and explanations.

One module decides how a cell crop becomes a network input, so that every path (the cached
training arrays, `predict`, `explain`) does exactly the same thing:

1. `read_image(path)` / `to_rgb_uint8(array)`: any image OpenCV reads (grayscale, BGR, BGRA,
   8- or 16-bit) becomes uint8 RGB [H, W, 3].
2. `resize_crop(crop, size, policy)`: one crop to a square `size` x `size` uint8 image.

   - `pad` (the default): pad the crop to a square with its own border colour (the per-channel
     median of its outermost pixel ring, i.e. the slide background around the cell), centred,
     then resize. SIPaKMeD crops are not square (48-553 px, aspect ratios up to about 2:1), and
     the classes differ in exactly what a stretch distorts: the cell's shape (round parabasal
     and metaplastic cells vs. flat polygonal superficial ones), relative sizes, and the
     nucleus/cytoplasm ratio, the feature cytologists read first. Padding keeps them; all
     crops are scaled by one factor per crop so shape and N/C stay true.
   - `stretch`: resize each axis independently to `size` (the seed's "resized to 224x224", and
     what ImageNet-style pipelines do). Kept as an option for comparison with published work.

   Shrinking uses `cv2.INTER_AREA` (anti-aliased), enlarging `cv2.INTER_LINEAR`.
   `crop_to_frame(points, crop_shape, size, policy)` maps crop coordinates (e.g. the
   nucleus/cytoplasm contours) into the resized frame, for saliency metrics.
3. `normalize(images, spec)` (jnp, inside jit): uint8 (or float on the 0-255 scale) to float,
   following the `preprocessing` dict of a model DIR's metadata (`channel_order`, `mean`,
   `std` on the 0-255 scale, in `channel_order`). `spec_for(source)` gives that dict for the
   weights this project fine-tunes: `'keras'` (Keras ResNet50 "caffe" mode: BGR, mean
   subtraction, no scaling), `'torchvision'` (RGB, ImageNet mean/std) and `'scratch'`
   (RGB scaled to [-1, 1], for training from random initialisation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

RESIZE_POLICIES = ("pad", "stretch")
DEFAULT_RESIZE = "pad"

# Mean/std on the 0-255 scale, in the order of `channel_order`.
_SPECS = {
    # keras.applications.resnet50.preprocess_input (mode "caffe"): RGB->BGR, subtract the
    # ImageNet BGR mean, no division.
    "keras": {"channel_order": "BGR", "mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0]},
    # torchvision ResNet50_Weights.IMAGENET1K_*: ToTensor (x/255) then Normalize(mean, std).
    "torchvision": {
        "channel_order": "RGB",
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
    },
    # From scratch: [0, 255] -> [-1, 1].
    "scratch": {
        "channel_order": "RGB",
        "mean": [127.5, 127.5, 127.5],
        "std": [127.5, 127.5, 127.5],
    },
}
WEIGHT_SOURCES = tuple(_SPECS)


def spec_for(source: str, image_size: int = 224, resize: str = DEFAULT_RESIZE) -> dict:
    """The metadata `preprocessing` dict for weights from `source` ('keras', 'torchvision',
    'scratch'), with the input size and resize policy the model is trained/evaluated with."""
    if source not in _SPECS:
        raise ValueError(f"Unknown weight source {source!r}: expected one of {WEIGHT_SOURCES}.")
    _check_policy(resize)
    spec = {k: (list(v) if isinstance(v, list) else v) for k, v in _SPECS[source].items()}
    spec.update(image_size=int(image_size), resize=resize)
    return spec


def validate_spec(spec: dict) -> None:
    """Raises a ValueError naming the field when a `preprocessing` dict is unusable."""
    if not isinstance(spec, dict):
        raise ValueError(f"preprocessing spec must be a dict, got {type(spec).__name__}.")
    for key in ("channel_order", "mean", "std"):
        if key not in spec:
            raise ValueError(
                f"preprocessing spec lacks {key!r} (has {sorted(spec)}); expected the dict "
                "written by sipak_jax.preprocessing.spec_for()."
            )
    if spec["channel_order"] not in ("RGB", "BGR"):
        raise ValueError(
            f"preprocessing.channel_order must be 'RGB' or 'BGR', got {spec['channel_order']!r}."
        )
    for key in ("mean", "std"):
        value = np.asarray(spec[key], dtype=np.float64)
        if value.shape != (3,):
            raise ValueError(f"preprocessing.{key} must hold 3 numbers, got {spec[key]!r}.")
    if np.any(np.asarray(spec["std"], dtype=np.float64) <= 0):
        raise ValueError(f"preprocessing.std must be positive, got {spec['std']!r}.")
    if "resize" in spec:
        _check_policy(spec["resize"])


def normalize(images, spec: dict, dtype=None):
    """uint8 RGB images [..., 3] (or floats on the 0-255 scale) -> normalised float arrays.

    `(x[..., order] - mean) / std`, with the channels reordered to `spec['channel_order']`
    first. jnp, usable inside jit; `dtype` defaults to float32 (pass bfloat16 for mixed
    precision: the arithmetic is done in float32 and cast at the end).
    """
    import jax.numpy as jnp

    validate_spec(spec)
    x = jnp.asarray(images)
    if x.shape[-1] != 3:
        raise ValueError(f"normalize expects RGB images [..., 3], got shape {x.shape}.")
    x = x.astype(jnp.float32)
    if spec["channel_order"] == "BGR":
        x = x[..., ::-1]
    mean = jnp.asarray(spec["mean"], jnp.float32)
    inv_std = 1.0 / jnp.asarray(spec["std"], jnp.float32)
    out = (x - mean) * inv_std
    return out.astype(dtype or jnp.float32)


def _check_policy(policy: str) -> None:
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"Unknown resize policy {policy!r}: expected one of {RESIZE_POLICIES}.")


def _check_crop(crop: np.ndarray, what: str = "crop") -> None:
    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8:
        raise ValueError(
            f"{what} must be a uint8 numpy array, got "
            f"{getattr(crop, 'dtype', type(crop).__name__)}; convert it with to_rgb_uint8()."
        )
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] < 1 or crop.shape[1] < 1:
        raise ValueError(f"{what} must be an RGB image [H, W, 3], got shape {crop.shape}.")


def border_colour(crop: np.ndarray) -> np.ndarray:
    """Per-channel lower median of the crop's outermost pixel ring, uint8 [3].

    In a SIPaKMeD crop (cell bounding box plus about 10 px) the ring is mostly slide
    background; the median ignores the odd neighbouring cell that touches the edge. The ring
    has an even number of pixels (2W + 2(H-2)), so the median is the lower of the two middle
    values (the ((n-1)//2)-th smallest): a colour that occurs in the ring, never an average.
    `sipak_jax.augment.border_colour` computes the same statistic in jnp (tested).
    """
    _check_crop(crop)
    ring = np.concatenate(
        [crop[0], crop[-1], crop[1:-1, 0], crop[1:-1, -1]], axis=0
    )  # [2W + 2(H-2), 3]
    return np.sort(ring, axis=0)[(len(ring) - 1) // 2].astype(np.uint8)


def pad_to_square(crop: np.ndarray, colour=None) -> np.ndarray:
    """Centres `crop` on a square canvas of side max(H, W) filled with `colour`
    (default: `border_colour(crop)`). Odd padding puts the extra pixel at the bottom/right."""
    _check_crop(crop)
    h, w = crop.shape[:2]
    side = max(h, w)
    if colour is None:
        colour = border_colour(crop)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray(colour, np.uint8)
    out[top : top + h, left : left + w] = crop
    return out


def _resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (out_h, out_w):
        return np.ascontiguousarray(image)
    shrinking = out_h * out_w < h * w
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (out_w, out_h), interpolation=interpolation)


def resize_crop(crop: np.ndarray, size: int, policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """One uint8 RGB crop [H, W, 3] -> uint8 [size, size, 3] under `policy` ('pad' or
    'stretch'; see the module docstring)."""
    _check_policy(policy)
    _check_crop(crop)
    if policy == "pad":
        crop = pad_to_square(crop)
    return _resize(crop, int(size), int(size))


def frame_transform(crop_shape: Sequence[int], size: int, policy: str = DEFAULT_RESIZE):
    """(scale_x, scale_y, offset_x, offset_y) such that a point (x, y) of the crop (pixel
    centres at integer coordinates) lands at `((x + offset_x + 0.5) * scale_x - 0.5, ...)` in
    the resized `size` x `size` frame: the half-pixel convention of `cv2.resize`."""
    _check_policy(policy)
    h, w = int(crop_shape[0]), int(crop_shape[1])
    if policy == "pad":
        side = max(h, w)
        return size / side, size / side, (side - w) // 2, (side - h) // 2
    return size / w, size / h, 0, 0


def crop_to_frame(
    points_xy, crop_shape: Sequence[int], size: int, policy: str = DEFAULT_RESIZE
) -> np.ndarray:
    """Maps points [N, 2] (x = column, y = row, in crop pixels; e.g. a SIPaKMeD contour) into
    the `size` x `size` frame `resize_crop(crop, size, policy)` produces. float32 [N, 2]."""
    pts = np.asarray(points_xy, np.float32).reshape(-1, 2)
    sx, sy, ox, oy = frame_transform(crop_shape, size, policy)
    out = np.empty_like(pts)
    out[:, 0] = (pts[:, 0] + ox + 0.5) * sx - 0.5
    out[:, 1] = (pts[:, 1] + oy + 0.5) * sy - 0.5
    return out


def to_rgb_uint8(image: np.ndarray, channel_order: str = "BGR", name: str = "image") -> np.ndarray:
    """Any image array as OpenCV reads it -> uint8 RGB [H, W, 3].

    - grayscale [H, W] or [H, W, 1]: replicated to 3 channels;
    - 3 channels in `channel_order` ('BGR' as `cv2.imread` returns, or 'RGB');
    - 4 channels (BGRA/RGBA): composited over white by their alpha (a transparent
      background becomes white, not whatever colour the hidden pixels hold);
    - uint16: scaled to 8 bits by x / 257 (65535 -> 255), rounded;
    - float: must already lie in [0, 1]; scaled by 255.
    Anything else raises a ValueError naming `name`.
    """
    if channel_order not in ("BGR", "RGB"):
        raise ValueError(f"channel_order must be 'BGR' or 'RGB', got {channel_order!r}.")
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(
            f"{name}: expected a grayscale, RGB or RGBA image, got an array of shape {a.shape}."
        )
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name}: the image is empty (shape {a.shape}).")
    if a.dtype == np.uint8:
        f = None
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 257.0
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise ValueError(
                f"{name}: floating-point pixels must lie in [0, 1] (found "
                f"{np.nanmin(a):.3g}..{np.nanmax(a):.3g}); save the image as 8- or 16-bit."
            )
        f = a.astype(np.float32) * 255.0
    else:
        raise ValueError(
            f"{name}: unsupported pixel type {a.dtype}; expected 8-bit, 16-bit or float in [0, 1]."
        )
    if a.ndim == 3 and a.shape[2] == 4:
        f = a.astype(np.float32) if f is None else f
        alpha = f[..., 3:4] / 255.0
        f = f[..., :3] * alpha + 255.0 * (1.0 - alpha)
    if f is not None:
        a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif channel_order == "BGR":
        a = a[..., ::-1]
    return np.ascontiguousarray(a)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads any image file OpenCV can decode (BMP, PNG, JPEG, TIFF, ...; 8/16-bit; gray, RGB,
    RGBA) as uint8 RGB [H, W, 3]. Raises FileNotFoundError / ValueError naming the file.

    The file's EXIF orientation is not applied (`cv2.IMREAD_UNCHANGED`): microscope images
    have none, and a rotated cell is still the same cell.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path}")
    return decode_image(np.fromfile(path, dtype=np.uint8), path)  # also non-ASCII paths


def undecodable(name: str) -> ValueError:
    """The error of a file that is not an image OpenCV decodes (one message everywhere)."""
    return ValueError(
        f"Cannot decode {name} as an image (empty, truncated or not an image format OpenCV "
        "reads); check the file or convert it to PNG."
    )


def decode_image(data, name: str) -> np.ndarray:
    """An encoded image file's bytes (or uint8 array) -> uint8 RGB [H, W, 3], as `read_image`
    (its errors name `name`)."""
    data = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise undecodable(name)
    return to_rgb_uint8(image, "BGR", name=name)


def preprocess_image(image_rgb: np.ndarray, spec: dict) -> np.ndarray:
    """One uint8 RGB image -> the uint8 [S, S, 3] network input (before `normalize`), using the
    spec's `image_size` and `resize` policy: the same resize the cached training data got."""
    validate_spec(spec)
    if "image_size" not in spec:
        raise ValueError("preprocessing spec lacks 'image_size'.")
    return resize_crop(image_rgb, int(spec["image_size"]), spec.get("resize", DEFAULT_RESIZE))
