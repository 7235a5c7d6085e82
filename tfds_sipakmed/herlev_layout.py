"""Reading a Herlev manual dir without TensorFlow: class folders or smear2005.zip, masks.

The official archive `smear2005.zip` (https://mde-lab.aegean.gr/index.php/downloads/) holds
`smear2005/New database pictures/<class>/`, one folder per class (`carcinoma_in_situ`,
`light_dysplastic`, `moderate_dysplastic`, `normal_columnar`, `normal_intermediate`,
`normal_superficiel`, `severe_dysplastic`). In each, a cell is `NAME.BMP` with its
segmentation `NAME-d.bmp`: red background, dark blue cytoplasm, bright blue nucleus.

`HerlevReader(manual_dir, options)` accepts the zip itself or the class folders anywhere up to
four levels below the manual dir (so `smear2005/New database pictures/...`, the folders alone,
or one more level of nesting), with case, space/hyphen and `superficial` spelling variants.
Every cell is its own group (Herlev gives no slide or source-image ids) unless
`options['group_regex']` is given (applied to the file name without extension; its first
group, or the whole match, is the group). See `tfds_sipakmed/herlev/README.md`.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping

import cv2
import numpy as np

from tfds_sipakmed import builder_util
from tfds_sipakmed.datasets import CellRef, DatasetError, log_of
from tfds_sipakmed.taxonomy import HERLEV

DOWNLOAD_PAGE = "https://mde-lab.aegean.gr/index.php/downloads/"
ARCHIVE_NAME = "smear2005.zip"
# Cells per class in Jantzen et al. 2005 (917 in all).
PUBLISHED_COUNTS = {
    "carcinoma_in_situ": 150,
    "light_dysplastic": 182,
    "moderate_dysplastic": 146,
    "normal_columnar": 98,
    "normal_intermediate": 70,
    "normal_superficiel": 74,
    "severe_dysplastic": 197,
}
# The -d.bmp colour coding (RGB): background red, cytoplasm dark blue, nucleus bright blue.
SEGMENT_COLOURS = {"background": (255, 0, 0), "cytoplasm": (0, 0, 128), "nucleus": (0, 0, 255)}
# A pixel farther than this (Euclidean, RGB) from every documented colour is "unknown"; more
# than UNKNOWN_LIMIT of them make the annotation invalid.
COLOUR_TOLERANCE = 60.0
UNKNOWN_LIMIT = 0.01
_MAX_DEPTH = 4
_SEG_SUFFIX = "-d.bmp"


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


# Folder names accepted for each class (normalised by `_norm`).
_ALIASES = {c: {c} for c in HERLEV.class_names}
_ALIASES["normal_superficiel"].add("normal_superficial")
_CLASS_OF = {alias: c for c, aliases in _ALIASES.items() for alias in aliases}


def _help() -> str:
    return (
        f"Download {ARCHIVE_NAME} from {DOWNLOAD_PAGE} and put it, or its extracted class "
        f"folders ({', '.join(HERLEV.class_names)}), in the manual dir."
    )


def _hidden(name: str) -> bool:
    """Dot files (.DS_Store, macOS ._NAME forks) are ignored wherever they are."""
    return name.startswith(".")


def _is_image(name: str) -> bool:
    low = name.lower()
    return low.endswith(".bmp") and not low.endswith(_SEG_SUFFIX)


# --------------------------------------------------------------------------------------------
# Finding the classes: folders or the zip


def _find_folders(manual_dir: str) -> dict[str, list[str]]:
    """{class: [folder paths]} for every folder named like a class, up to `_MAX_DEPTH` deep."""
    found: dict[str, list[str]] = {}
    root_depth = manual_dir.rstrip(os.sep).count(os.sep)
    for dirpath, dirnames, _ in os.walk(manual_dir):
        dirnames[:] = [d for d in dirnames if not _hidden(d) and d != "__MACOSX"]
        if dirpath.count(os.sep) - root_depth >= _MAX_DEPTH:
            dirnames[:] = []
        for d in sorted(dirnames):
            cls = _CLASS_OF.get(_norm(d))
            if cls is not None:
                found.setdefault(cls, []).append(os.path.join(dirpath, d))
    return found


def _find_zips(manual_dir: str) -> list[str]:
    return sorted(
        os.path.join(manual_dir, f)
        for f in os.listdir(manual_dir)
        if f.lower().endswith(".zip") and os.path.isfile(os.path.join(manual_dir, f))
    )


def _zip_members(path: str) -> dict[str, list[str]]:
    """{class: [member names]} of the files whose parent folder is named like a class."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f"{path}: not a readable zip archive ({e}). {_help()}") from None
    out: dict[str, list[str]] = {}
    for n in names:
        parts = n.split("/")
        if len(parts) < 2 or _hidden(parts[-1]) or "__MACOSX" in parts:
            continue
        cls = _CLASS_OF.get(_norm(parts[-2]))
        if cls is not None:
            out.setdefault(cls, []).append(n)
    for cls, members in out.items():
        folders = sorted({m.rsplit("/", 1)[0] for m in members})
        if len(folders) > 1:
            raise DatasetError(f"{path}: class {cls} is in {len(folders)} folders {folders}.")
    return out


def _check_complete(found: Mapping, where: str) -> None:
    missing = [c for c in HERLEV.class_names if c not in found]
    if missing:
        raise DatasetError(
            f"{where}: no folder for the Herlev classes {missing} "
            f"(found {sorted(found) or 'none'}). {_help()}"
        )


# --------------------------------------------------------------------------------------------
# Pairing each cell with its segmentation


def _pair(names: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """([(image, segmentation or None)], [other files]) among the base names of one folder."""
    lower = {n.lower(): n for n in names}
    pairs, used = [], set()
    for n in sorted(names):
        if _is_image(n):
            seg = lower.get(os.path.splitext(n)[0].lower() + _SEG_SUFFIX)
            pairs.append((n, seg))
            used.update({n, seg})
    others = sorted(n for n in names if n not in used)
    return pairs, others


def config_name(folds: str, group_regex: str = "") -> str:
    """The TFDS builder config of a build: `folds` (`grouped` / `random_cells`), or
    `<folds>-regex-<sha256(group_regex)[:8]>` with a grouping expression."""
    part = f"regex-{builder_util.short_digest(group_regex)}" if group_regex else ""
    return builder_util.config_name(folds, part)


def _group_of(file_name: str, stem: str, pattern: re.Pattern | None) -> str:
    if pattern is None:
        return file_name
    m = pattern.search(stem)
    if m is None:
        raise DatasetError(
            f"{file_name}: --group_regex {pattern.pattern!r} does not match its name {stem!r}; "
            "fix the expression or leave it out (each cell is then its own group)."
        )
    return m.group(1) if m.re.groups else m.group(0)


class HerlevReader:
    """The Herlev Pap smear benchmark (smear2005) as the user has it; see the module docstring."""

    name = "herlev"
    taxonomy = HERLEV

    def __init__(self, manual_dir, options: Mapping | None = None):
        options = dict(options or {})
        self.manual_dir = os.fspath(manual_dir)
        self._log = log_of(options)
        regex = options.get("group_regex") or None
        try:
            self._group_re = re.compile(regex) if regex else None
        except re.error as e:
            raise DatasetError(
                f"--group_regex {regex!r} is not a regular expression: {e}"
            ) from None
        if not os.path.isdir(self.manual_dir):
            raise DatasetError(f"{self.manual_dir}: no such folder. {_help()}")
        self._sources()  # a manual dir without the dataset fails here, before any build starts

    def _sources(self) -> tuple[str, object]:
        """('folders', {class: dir}) or ('zip', (path, {class: [members]}))."""
        folders = _find_folders(self.manual_dir)
        zips = _find_zips(self.manual_dir)
        if folders:
            doubled = {c: v for c, v in folders.items() if len(v) > 1}
            if doubled:
                c, v = sorted(doubled.items())[0]
                raise DatasetError(
                    f"class {c} is in {len(v)} folders ({', '.join(v)}); keep one of them."
                )
            _check_complete(folders, self.manual_dir)
            if zips:
                self._log(f"Herlev: reading the extracted folders; ignoring {', '.join(zips)}")
            return "folders", {c: v[0] for c, v in folders.items()}
        for z in zips:
            members = _zip_members(z)
            if members:
                _check_complete(members, z)
                return "zip", (z, members)
        raise DatasetError(
            f"{self.manual_dir}: no Herlev class folders and no {ARCHIVE_NAME}. {_help()}"
        )

    def config_name(self, refs, folds: str) -> str:
        """The TFDS builder config a build with these options gets (`config_name`)."""
        return config_name(folds, self._group_re.pattern if self._group_re else "")

    def list_cells(self) -> list[CellRef]:
        kind, src = self._sources()
        refs, others, no_seg = [], [], 0
        for cls in HERLEV.class_names:
            if kind == "folders":
                folder = src[cls]
                names = [
                    n
                    for n in os.listdir(folder)
                    if not _hidden(n) and os.path.isfile(os.path.join(folder, n))
                ]
                where = ("dir", folder)
            else:
                members = src[1][cls]
                folder = members[0].rsplit("/", 1)[0]
                names = [m.rsplit("/", 1)[1] for m in members]
                where = ("zip", src[0], folder)
            pairs, extra = _pair(names)
            if not pairs:
                raise DatasetError(f"{folder}: the {cls} folder holds no .BMP cell. {_help()}")
            others += [f"{cls}/{n}" for n in extra]
            for image, seg in pairs:
                no_seg += seg is None
                file_name = f"{cls}/{image}"
                group = _group_of(file_name, os.path.splitext(image)[0], self._group_re)
                label = HERLEV.class_names.index(cls)
                refs.append(CellRef(file_name, group, label, (*where, image, seg)))
        self._warn(others, no_seg)
        return sorted(refs, key=lambda r: r.file_name)

    def _warn(self, others: list[str], no_seg: int) -> None:
        if others:
            shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
            self._log(
                f"warning: Herlev: {len(others)} files are neither cells nor their -d.bmp: {shown}"
            )
        if no_seg:
            self._log(
                f"warning: Herlev: {no_seg} cells have no -d.bmp segmentation; they are kept for "
                "classification with annotation_valid=False (no masks)"
            )

    def load_cell(self, ref: CellRef) -> dict:
        """The example of `ref`: image, label, masks from its -d.bmp, annotation validity."""
        image = _decode(_read_bytes(ref.extra, ref.extra[-2]), ref.file_name)
        seg_name = ref.extra[-1]
        if seg_name is None:
            masks, issue = _empty_masks(image.shape[:2]), f"no segmentation {_stem(ref)}-d.bmp"
        else:
            seg = _decode(_read_bytes(ref.extra, seg_name), f"{ref.file_name} ({seg_name})")
            masks, issue = segment_masks(seg, image.shape[:2])
        return {
            "image": image,
            "label": ref.label,
            "file_name": ref.file_name,
            "group_id": ref.group_id,
            "nucleus_mask": masks["nucleus"],
            "cytoplasm_mask": masks["cytoplasm"],
            "annotation_valid": not issue,
            "annotation_issue": issue,
        }


def _stem(ref: CellRef) -> str:
    return os.path.splitext(ref.extra[-2])[0]


def _read_bytes(where: tuple, name: str) -> bytes:
    """The bytes of file `name` of a cell's folder (`where`: ('dir', folder, ...) or
    ('zip', archive, folder, ...))."""
    try:
        if where[0] == "dir":
            with open(os.path.join(where[1], name), "rb") as f:
                return f.read()
        with zipfile.ZipFile(where[1]) as z:
            return z.read(f"{where[2]}/{name}")
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{name}: cannot be read ({e}); re-extract or re-download it.") from None


def _decode(data: bytes, what: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a BMP (palette BMPs are expanded), or DatasetError naming it."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise DatasetError(f"{what}: not a readable image (truncated or damaged); re-extract it.")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _empty_masks(shape) -> dict[str, np.ndarray]:
    return {k: np.zeros(shape, bool) for k in ("nucleus", "cytoplasm")}


def segment_masks(seg_rgb: np.ndarray, shape) -> tuple[dict[str, np.ndarray], str]:
    """({'nucleus', 'cytoplasm'} bool masks, issue) from a -d.bmp decoded to RGB.

    Each pixel takes the documented colour nearest to it (`SEGMENT_COLOURS`) when within
    `COLOUR_TOLERANCE`. `issue` is empty when the masks are usable, else why not (the masks
    are then all False): another size than the cell image, more than `UNKNOWN_LIMIT` of the
    pixels in no documented colour, or no nucleus."""
    if seg_rgb.shape[:2] != tuple(shape):
        h, w = seg_rgb.shape[:2]
        return _empty_masks(shape), (
            f"segmentation is {w}x{h} px, the cell image {shape[1]}x{shape[0]}"
        )
    ref = np.array(list(SEGMENT_COLOURS.values()), np.float32)  # [3, 3]
    dist = np.linalg.norm(seg_rgb[..., None, :].astype(np.float32) - ref, axis=-1)
    nearest = np.argmin(dist, axis=-1)
    known = dist.min(axis=-1) <= COLOUR_TOLERANCE
    unknown = 1.0 - known.mean()
    names = list(SEGMENT_COLOURS)
    masks = {k: known & (nearest == names.index(k)) for k in ("nucleus", "cytoplasm")}
    if unknown > UNKNOWN_LIMIT:
        return _empty_masks(shape), (
            f"{unknown:.1%} of the segmentation's pixels are in none of the documented colours "
            "(red background, dark blue cytoplasm, bright blue nucleus)"
        )
    if not masks["nucleus"].any():
        return _empty_masks(shape), "no nucleus in the segmentation"
    return masks, ""


def count_report(refs) -> tuple[list[str], list[str]]:
    """(lines 'class: n', warnings where a count differs from `PUBLISHED_COUNTS`)."""
    counts = {c: 0 for c in HERLEV.class_names}
    for r in refs:
        counts[HERLEV.class_names[r.label]] += 1
    lines = [f"  {c}: {n}" for c, n in counts.items()]
    warnings = [
        f"warning: {c} has {n} cells; Jantzen et al. 2005 published {PUBLISHED_COUNTS[c]}"
        for c, n in counts.items()
        if n != PUBLISHED_COUNTS[c]
    ]
    return lines, warnings
