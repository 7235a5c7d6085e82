"""Saliency overlays: a map drawn over the cell as the pathologist sees it.

`map_to_crop` takes a map from the model's input frame (S x S, after the `pad` or `stretch`
resize of `sipak_jax.preprocessing`) back to the original crop's own pixels; `overlay` blends
a colour-mapped map over an RGB image (the map's strength sets the blend, so unimportant
regions show the untouched cell); `save_png` writes without ever replacing an existing file;
`overlay_batch` is what the training loop calls to log overlays of fixed validation cells.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from sipak_jax import preprocessing

DEFAULT_ALPHA = 0.6


def map_to_crop(frame_map: np.ndarray, crop_shape, policy: str = "pad") -> np.ndarray:
    """A map [S,S] in the input frame -> [H,W] float32 on the crop's own pixels (bilinear,
    through the inverse of the resize policy's coordinate mapping)."""
    m = np.asarray(frame_map, np.float32)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square 2-D map in the input frame, got shape {m.shape}")
    h, w = int(crop_shape[0]), int(crop_shape[1])
    sx, sy, ox, oy = preprocessing.frame_transform((h, w), m.shape[0], policy)
    xs = (np.arange(w, dtype=np.float32) + ox + 0.5) * sx - 0.5
    ys = (np.arange(h, dtype=np.float32) + oy + 0.5) * sy - 0.5
    map_x, map_y = np.meshgrid(xs, ys)
    return cv2.remap(m, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def colorize(normalized: np.ndarray, colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """[H,W] in [0, 1] -> uint8 RGB [H,W,3] through an OpenCV colour map."""
    m = np.nan_to_num(np.asarray(normalized, np.float32), nan=0.0)
    u8 = np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8)
    return cv2.applyColorMap(u8, colormap)[..., ::-1]


def overlay(image_rgb: np.ndarray, normalized: np.ndarray, alpha: float = DEFAULT_ALPHA):
    """Blend the colour-mapped `normalized` map [H,W] in [0, 1] over `image_rgb` uint8
    [H,W,3]; the blend weight is `alpha * map`. Returns uint8 RGB [H,W,3]."""
    img = np.asarray(image_rgb)
    m = np.clip(np.nan_to_num(np.asarray(normalized, np.float32)), 0.0, 1.0)
    if img.shape[:2] != m.shape:
        raise ValueError(f"overlay: image {img.shape[:2]} and map {m.shape} differ in size")
    weight = (alpha * m)[..., None]
    out = (1.0 - weight) * img.astype(np.float32) + weight * colorize(m).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(path: str | os.PathLike, image_rgb: np.ndarray, overwrite: bool = False) -> None:
    """Write uint8 RGB as PNG; refuses to replace an existing file unless `overwrite`."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; not overwriting it (pass overwrite to replace)")
    ok, data = cv2.imencode(".png", np.asarray(image_rgb)[..., ::-1])
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    with open(path, "wb") as f:
        f.write(data.tobytes())


def overlay_batch(
    model,
    images_uint8,
    spec: dict,
    method: str = "gradcam",
    target=None,
    *,
    stage: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    **options,
) -> np.ndarray:
    """Overlays of `method`'s map on a batch of network inputs, for TensorBoard.

    model: a ResNet (its mode is left alone; explanations use BatchNorm in inference mode)
      or a `saliency.ModelFunctions` kept across epochs and refreshed with `update_state`
      (no recompilation).
    images_uint8: [B,S,S,3] uint8 RGB inputs (already resized, as the input pipeline holds
      them); normalised here with `spec` (the model's `preprocessing` dict).
    target: None (predicted class) or the true labels [B].
    stage: the CAM family's stage; None: `saliency.overlay_stage(model, S)` (the deepest stage
      whose map is at least 7x7: layer2 at 64 px, layer4 at 224 px).
    Returns float32 [B,S,S,3] in [0, 1] (clu's `write_images` format).
    """
    from sipak_jax import saliency

    imgs = np.asarray(images_uint8)
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8:
        raise ValueError(
            f"overlay_batch needs uint8 RGB images [B,S,S,3], got {imgs.dtype} {imgs.shape}"
        )
    x = preprocessing.normalize(imgs, spec)
    if stage is None:
        stage = saliency.overlay_stage(model, imgs.shape[1])
    result = saliency.explain(model, x, method, target=target, stage=stage, spec=spec, **options)
    out = np.stack([overlay(imgs[i], result.normalized[i], alpha) for i in range(len(imgs))])
    return out.astype(np.float32) / 255.0
