"""Reading a CRIC Cervix manual dir without TensorFlow: the classification table, the images,
one square crop per marked nucleus.

The CRIC platform's download (https://database.cric.com.br, "CRIC Cervix Cell
Classification"; also figshare doi:10.6084/m9.figshare.c.4960286) is a zip holding the 400
images (PNG, 1376 x 1020 px) and `classifications.csv` (columns `image_id, image_filename,
image_doi, cell_id, bethesda_system, nucleus_x, nucleus_y`) and `classifications.json` (a
list of images `{image_id, image_doi, image_name, classifications: [{cell_id,
bethesda_system, nucleus_x, nucleus_y}]}`). `bethesda_system` is one of "Negative for
intraepithelial lesion", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC".

`CricReader(manual_dir, options)` reads the extracted zip: the table (CSV, else JSON) anywhere
up to three levels deep, each image found by its file name anywhere below the manual dir. Each
cell is a `crop_size` x `crop_size` crop (option `crop_size`, default `DEFAULT_CROP_SIZE`)
centred on its nucleus; where the window leaves the image the crop is padded with the image's
border colour and the example says so (`border_padded`). The group is the image id: cells of
one image never sit in two folds. See `tfds_sipakmed/cric/README.md`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Mapping

import cv2
import numpy as np

from tfds_sipakmed import builder_util
from tfds_sipakmed.datasets import CellRef, DatasetError, log_of
from tfds_sipakmed.taxonomy import CRIC

DOWNLOAD_PAGE = "https://database.cric.com.br/downloads"
# The crop of the CRIC authors' own classification work (Diniz et al., J. Imaging 2021: 90 x 90
# px cut-outs centred on the nucleus).
DEFAULT_CROP_SIZE = 90
TABLES = ("classifications.csv", "classifications.json")
COLUMNS = ("image_id", "image_filename", "cell_id", "bethesda_system", "nucleus_x", "nucleus_y")
# The table's spelling of each class (the platform writes NILM in full).
LABEL_OF = {c: i for i, c in enumerate(CRIC.class_names)}
LABEL_OF["Negative for intraepithelial lesion"] = CRIC.class_names.index("NILM")
# Cells per class in Rezende et al. 2021 (11,534 in all).
PUBLISHED_COUNTS = {
    "NILM": 6779,
    "ASC-US": 606,
    "LSIL": 1360,
    "ASC-H": 925,
    "HSIL": 1703,
    "SCC": 161,
}
NO_MASK_ISSUE = "no segmentation: CRIC classifications mark the nucleus centre only"
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_MAX_DEPTH = 3


def _help() -> str:
    return (
        f"Download CRIC Cervix Cell Classification (images and classifications) from "
        f"{DOWNLOAD_PAGE} and extract the zip into the manual dir."
    )


def crop_size_of(options: Mapping) -> int:
    """The `crop_size` option as a positive int (default `DEFAULT_CROP_SIZE`)."""
    value = options.get("crop_size")
    value = DEFAULT_CROP_SIZE if value is None or value == "" else value
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 2:
        raise DatasetError(f"crop_size must be a whole number of at least 2 pixels, got {value!r}")
    return int(value)


def config_name(folds: str, crop_size: int) -> str:
    """The TFDS builder config of a build: `folds` (`grouped` / `random_cells`) for the default
    crop, `<folds>-crop<N>` for another."""
    part = "" if int(crop_size) == DEFAULT_CROP_SIZE else f"crop{int(crop_size)}"
    return builder_util.config_name(folds, part)


# --------------------------------------------------------------------------------------------
# The table


def _walk(manual_dir: str):
    """(dirpath, filenames) up to `_MAX_DEPTH` below `manual_dir`, hidden entries skipped."""
    root_depth = manual_dir.rstrip(os.sep).count(os.sep)
    for dirpath, dirnames, filenames in os.walk(manual_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        if dirpath.count(os.sep) - root_depth >= _MAX_DEPTH:
            dirnames[:] = []
        yield dirpath, [f for f in filenames if not f.startswith(".")]


def find_table(manual_dir: str) -> str:
    """The classification table: classifications.csv, else classifications.json."""
    found = {t: [] for t in TABLES}
    for dirpath, filenames in _walk(manual_dir):
        for f in filenames:
            if f.lower() in found:
                found[f.lower()].append(os.path.join(dirpath, f))
    for table in TABLES:
        paths = found[table]
        if len(paths) > 1:
            raise DatasetError(f"{len(paths)} files named {table} ({', '.join(paths)}); keep one.")
        if paths:
            return paths[0]
    zips = [f for _, fs in _walk(manual_dir) for f in fs if f.lower().endswith(".zip")]
    hint = f" Extract {zips[0]} first." if zips else ""
    raise DatasetError(f"{manual_dir}: no {' or '.join(TABLES)}.{hint} {_help()}")


def _csv_rows(path: str) -> list[tuple[str, dict]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(
                f"{path}: missing columns {missing}; expected a header with {', '.join(COLUMNS)}"
            )
        return [(f"{path}:{i}", row) for i, row in enumerate(reader, start=2)]


def _json_rows(path: str) -> list[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            images = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not readable JSON ({e})") from None
    rows = []
    for i, img in enumerate(images if isinstance(images, list) else []):
        name = img.get("image_filename", img.get("image_name"))
        for j, cell in enumerate(img.get("classifications", [])):
            row = {"image_id": img.get("image_id"), "image_filename": name, **cell}
            rows.append((f"{path}: image {i}, cell {j}", row))
    if not rows:
        raise DatasetError(f"{path}: expected a list of images with their classifications")
    return rows


def read_table(path: str) -> list[tuple[str, dict]]:
    """[(where, row)]: every classification with where it is (file:line, or JSON position)."""
    return _json_rows(path) if path.lower().endswith(".json") else _csv_rows(path)


def _parse(where: str, row: Mapping) -> tuple[str, str, str, int, int, int]:
    """(image file name, image id, cell id, label, x, y) of one row, or DatasetError."""
    for c in COLUMNS:
        if row.get(c) in (None, ""):
            raise DatasetError(f"{where}: empty {c}")
    name = str(row["bethesda_system"]).strip()
    if name not in LABEL_OF:
        raise DatasetError(
            f"{where}: unknown bethesda_system {name!r}; expected one of {sorted(LABEL_OF)}"
        )
    try:
        x, y = int(round(float(row["nucleus_x"]))), int(round(float(row["nucleus_y"])))
    except ValueError:
        raise DatasetError(
            f"{where}: nucleus_x/nucleus_y must be numbers, got "
            f"{row['nucleus_x']!r}, {row['nucleus_y']!r}"
        ) from None
    image = os.path.basename(str(row["image_filename"]).strip())
    return image, str(row["image_id"]).strip(), str(row["cell_id"]).strip(), LABEL_OF[name], x, y


# --------------------------------------------------------------------------------------------
# Images and crops


def _index_images(manual_dir: str) -> dict[str, list[str]]:
    """{file name: [relative paths]} of the image files below the manual dir."""
    out: dict[str, list[str]] = {}
    for dirpath, filenames in _walk(manual_dir):
        for f in filenames:
            if f.lower().endswith(_IMAGE_EXTS):
                out.setdefault(f, []).append(os.path.relpath(os.path.join(dirpath, f), manual_dir))
    return out


def _resolve(name: str, index: Mapping, where: str) -> str:
    paths = index.get(name, [])
    if len(paths) > 1:
        raise DatasetError(f"{where}: image {name} is in {len(paths)} places {paths}; keep one.")
    return paths[0] if paths else ""


@functools.lru_cache(maxsize=4)
def _read_image(path: str) -> np.ndarray:
    """RGB uint8 of a base image (cells of one image come in a row: the last few are cached)."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"{path}: missing or not a readable image; re-extract the download.")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb.setflags(write=False)
    return rgb


def ring_median(image: np.ndarray) -> np.ndarray:
    """Per-channel lower median of the image's outermost pixel ring, uint8 [3]: the same
    statistic as `sipak_jax.preprocessing.border_colour` (tested equal)."""
    ring = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]], axis=0)
    return np.sort(ring, axis=0)[(len(ring) - 1) // 2].astype(np.uint8)


def crop_at(image: np.ndarray, x: int, y: int, size: int) -> tuple[np.ndarray, bool]:
    """(size x size crop whose pixel (size // 2, size // 2) is image pixel (x, y), padded)
    where the window leaves the image it is filled with `ring_median(image)`."""
    h, w = image.shape[:2]
    x0, y0 = x - size // 2, y - size // 2
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
    if (sx0, sy0, sx1, sy1) == (x0, y0, x0 + size, y0 + size):
        return np.ascontiguousarray(image[y0 : y0 + size, x0 : x0 + size]), False
    out = np.empty((size, size, 3), np.uint8)
    out[...] = ring_median(image)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out, True


class CricReader:
    """CRIC Cervix cells cut from the 400 images; see the module docstring."""

    name = "cric"
    taxonomy = CRIC

    def __init__(self, manual_dir, options: Mapping | None = None):
        options = dict(options or {})
        self.manual_dir = os.fspath(manual_dir)
        self.crop_size = crop_size_of(options)
        self._log = log_of(options)
        if not os.path.isdir(self.manual_dir):
            raise DatasetError(f"{self.manual_dir}: no such folder. {_help()}")
        self.table = find_table(self.manual_dir)  # fails here, before any build starts

    def config_name(self, refs, folds: str) -> str:
        """The TFDS builder config a build with these options gets (`config_name`)."""
        return config_name(folds, self.crop_size)

    def list_cells(self) -> list[CellRef]:
        self._log(f"CRIC: reading {os.path.relpath(self.table, self.manual_dir)}")
        index = _index_images(self.manual_dir)
        refs, seen, missing = [], {}, []
        for where, row in read_table(self.table):
            image, image_id, cell_id, label, x, y = _parse(where, row)
            rel = _resolve(image, index, where)
            if not rel:
                missing.append(f"{image} ({where})")
                continue
            file_name = f"{rel.replace(os.sep, '/')}#cell{cell_id}"
            if file_name in seen:
                raise DatasetError(
                    f"{where}: cell {cell_id} of {image} is also at {seen[file_name]}"
                )
            seen[file_name] = where
            extra = (os.path.join(self.manual_dir, rel), x, y, where)
            refs.append(CellRef(file_name, image_id, label, extra))
        if missing:
            shown = "; ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise DatasetError(
                f"{len(missing)} classified cells name images that are not in "
                f"{self.manual_dir}: {shown}. {_help()}"
            )
        return sorted(refs, key=lambda r: r.file_name)

    def load_cell(self, ref: CellRef) -> dict:
        """The crop of `ref` (its nucleus at the centre) in the common schema, plus
        `cell_id`, `nucleus_xy` (the nucleus in the image) and `border_padded`."""
        path, x, y, where = ref.extra
        image = _read_image(path)
        h, w = image.shape[:2]
        if not (0 <= x <= w and 0 <= y <= h):
            raise DatasetError(
                f"{where}: nucleus ({x}, {y}) lies outside {os.path.basename(path)} ({w}x{h} px)"
            )
        # Coordinates are documented as 1..width / 1..height: the edge value stays in the image.
        crop, padded = crop_at(image, min(x, w - 1), min(y, h - 1), self.crop_size)
        return {
            "image": crop,
            "label": ref.label,
            "file_name": ref.file_name,
            "group_id": ref.group_id,
            "cell_id": ref.file_name.rsplit("#cell", 1)[1],
            "nucleus_xy": np.array([x, y], np.int32),
            "border_padded": padded,
            "annotation_valid": False,
            "annotation_issue": NO_MASK_ISSUE,
        }


def count_report(refs) -> tuple[list[str], list[str]]:
    """(lines 'class: n', warnings where a count differs from `PUBLISHED_COUNTS`)."""
    counts = {c: 0 for c in CRIC.class_names}
    for r in refs:
        counts[CRIC.class_names[r.label]] += 1
    lines = [f"  {c}: {n}" for c, n in counts.items()]
    warnings = [
        f"warning: {c} has {n} cells; Rezende et al. 2021 published {PUBLISHED_COUNTS[c]}"
        for c, n in counts.items()
        if n != PUBLISHED_COUNTS[c]
    ]
    return lines, warnings
