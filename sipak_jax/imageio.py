"""Reading the image files a user gives to `predict` and `explain`.

- `IMAGE_EXTENSIONS`: what counts as an image when a directory is given (a file named
  explicitly is tried whatever its extension).
- `is_image_file(path)`: a path with one of those extensions.
- `read_for_model(path, spec)`: one file -> the network input under the model's preprocessing
  (`sipak_jax.preprocessing.read_image` then `preprocess_image`), never raising: an unreadable
  file is reported as an error string so that the other files still run.
- `decode_for_model(data, spec, name, max_pixels=)`: the same for a file's bytes (the
  screening service's uploads), with the pixel count checked from the header before decoding.
"""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when `path` ends in one of `IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def read_for_model(path: str, spec: dict, keep_original: bool = False):
    """(uint8 [S, S, 3] network input, original RGB or None, None) or (None, None, error)."""
    from sipak_jax import preprocessing

    try:
        rgb = preprocessing.read_image(path)
        return preprocessing.preprocess_image(rgb, spec), (rgb if keep_original else None), None
    except (OSError, ValueError) as e:
        return None, None, str(e) or type(e).__name__
    except Exception as e:  # noqa: BLE001 - e.g. cv2.error on an exotic file: report, go on
        return None, None, f"{type(e).__name__}: {e}"


def decode_for_model(
    data: bytes, spec: dict, name: str, keep_original: bool = False, max_pixels: int | None = None
):
    """`read_for_model` for a file's bytes (an upload), with the same results and messages
    (naming `name`). With `max_pixels`, the header is read first (`sipak_jax.imageheader`):
    only PNG, JPEG, BMP and TIFF files are decoded, and an image of more pixels is refused
    before anything is decompressed."""
    from sipak_jax import imageheader, preprocessing

    try:
        if max_pixels is not None:
            found = imageheader.dimensions(data)
            if found is None:
                raise preprocessing.undecodable(name)
            fmt, w, h = found
            if w * h > max_pixels:
                raise ValueError(
                    f"{name}: the {fmt.upper()} header says {w}x{h} pixels, more than the "
                    f"limit of {max_pixels:,}; crop or downscale the image"
                )
        rgb = preprocessing.decode_image(data, name)
        return preprocessing.preprocess_image(rgb, spec), (rgb if keep_original else None), None
    except (OSError, ValueError) as e:
        return None, None, str(e) or type(e).__name__
    except Exception as e:  # noqa: BLE001 - e.g. cv2.error on an exotic file: report, go on
        return None, None, f"{type(e).__name__}: {e}"
