"""Any lab's folder of cell crops, `ROOT/<class name>/<image files>`, as a dataset (TF-free).

The layout of most public copies and of lab exports: one folder per class directly under ROOT,
image files inside (subfolders of a class folder are read too; their path is part of the
`file_name`). Images: BMP, PNG, JPEG or TIFF, 8- or 16-bit, grayscale, RGB or RGBA, read
exactly as `sipak_jax.predict` reads them (`sipak_jax.preprocessing.read_image`), so a model
sees the same pixels in training and in the clinic.

Options (`tfds_sipakmed.datasets.reader("cell_folder", ROOT, options)`):
- `group_regex`: a regular expression searched in each file's name without its extension; its
  first group (or, without groups, the whole match) is the group id, e.g. `^(slide\\d+)_` for
  `slide07_cell003.png`. A file it does not match is an error naming the file.
- `group_csv`: a CSV file with the columns `file,group` (`file`: the path under ROOT,
  `Class/name.png`, or the bare file name when it is unique).
- neither: every file is its own group. Cells of one slide may then sit in the training and the
  test folds: a warning is printed and recorded (`grouping["leak_free"]` is False).
- `taxonomy`: a JSON file (below); without one, `Taxonomy.bare(classes)`: the class names and
  no clinical reading.

Taxonomy JSON: `{"abnormal": [...], "class_names": [...], "views": {...}, "readings": {...}}`.
`abnormal` (the classes counted abnormal; may be empty) is required; `class_names` (the label
order; default: the folder names sorted), `views` and `readings` are optional and follow
`tfds_sipakmed.taxonomy.Taxonomy`. Every class it names must be a folder and every folder a
class of it.

Ignored, and said once: hidden entries (`.DS_Store`, `._x.png`, `.git`), `__MACOSX`,
`Thumbs.db`, `desktop.ini`, and files lying directly in ROOT (e.g. the taxonomy or the CSV).
Errors (`DatasetError`, naming the file or folder and the fix): a missing or empty ROOT, an
empty class folder, a file that is not an image, an unmatched file, a bad regex, CSV or
taxonomy. A class with fewer groups than folds gets a warning: stratified folds are impossible
and some test folds will have none of it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Mapping

from tfds_sipakmed.datasets import CellRef, DatasetError, log_of
from tfds_sipakmed.folds import NUM_FOLDS
from tfds_sipakmed.taxonomy import Taxonomy

NAME = "cell_folder"
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
_IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
# First bytes of the formats read: BMP, PNG, JPEG, TIFF (little and big endian).
_MAGIC = (b"BM", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_NAMES


def _is_image(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return any(head.startswith(m) for m in _MAGIC)


class CellFolderReader:
    """`ROOT/<class>/<images>`; see the module docstring for the options and the errors."""

    name = NAME

    def __init__(self, manual_dir, options: Mapping | None = None):
        options = dict(options or {})
        self.root = os.path.abspath(os.path.expanduser(os.fspath(manual_dir)))
        self._log = log_of(options)
        self.warnings: list[str] = []
        self._root_ignored: list[str] = []
        self.ignored: list[str] = []  # hidden or system entries the last list_cells skipped
        folders = self._class_folders()
        self.taxonomy = load_taxonomy(options.get("taxonomy") or "", folders)
        self.grouping = _grouping_rule(options)
        if self.grouping["warning"]:
            self._warn(self.grouping["warning"])

    def _warn(self, line: str) -> None:
        self.warnings.append(line)
        self._log(f"warning: {line}")

    def _class_folders(self) -> list[str]:
        if not os.path.isdir(self.root):
            raise DatasetError(
                f"cell_folder: {self.root} is not a folder; pass ROOT holding one folder per "
                "class (ROOT/<class name>/<image files>)"
            )
        folders, loose = [], []
        for entry in sorted(os.listdir(self.root)):
            if _hidden(entry):
                self._root_ignored.append(entry)
            elif os.path.isdir(os.path.join(self.root, entry)):
                folders.append(entry)
            else:
                loose.append(entry)
        if not folders:
            raise DatasetError(
                f"cell_folder: {self.root} holds no class folders (found {loose[:5] or 'nothing'})"
                "; put each class's images in ROOT/<class name>/"
            )
        if loose:
            self._log(
                f"cell_folder: ignoring {len(loose)} file(s) directly in {self.root}: "
                + ", ".join(loose[:5])
            )
        return folders

    def list_cells(self) -> list[CellRef]:
        """Every image, sorted by `file_name` (`<class>/<path>`); errors name the file."""
        self._skipped: dict[str, list[str]] = {}
        self.warnings = [w for w in (self.grouping["warning"],) if w]  # small classes: below
        files = {c: self._class_files(c) for c in self.taxonomy.class_names}
        groups = _group_ids(self.grouping, self.root, [f for fs in files.values() for f in fs])
        refs = [
            CellRef(f, groups[f], label, ())
            for label, c in enumerate(self.taxonomy.class_names)
            for f in files[c]
        ]
        self.ignored = self._root_ignored + [
            os.path.join(c, n) for c in self.taxonomy.class_names for n in self._skipped[c]
        ]
        if self.ignored:  # said in the build, the training console and results.json
            self._warn(
                f"cell_folder: ignored {len(self.ignored)} hidden or system entr(ies): "
                + ", ".join(self.ignored[:5])
                + (" ..." if len(self.ignored) > 5 else "")
            )
        n_groups = len({r.group_id for r in refs})
        if n_groups < NUM_FOLDS:
            raise DatasetError(
                f"cell_folder: {self.root} holds {n_groups} group(s) ({self.grouping['rule']} "
                f"grouping): the {NUM_FOLDS} folds need at least {NUM_FOLDS}; add images or use "
                "a finer grouping rule"
            )
        self._warn_small_classes(refs)
        return sorted(refs, key=lambda r: r.file_name)

    def _class_files(self, cls: str) -> list[str]:
        folder = os.path.join(self.root, cls)
        out, skipped = [], self._skipped.setdefault(cls, [])
        for dirpath, dirnames, filenames in os.walk(folder):
            skipped += [d for d in dirnames if _hidden(d)]
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if _hidden(name):
                    skipped.append(name)
                    continue
                if not _is_image(path):
                    raise DatasetError(
                        f"cell_folder: {path} is not an image (expected BMP, PNG, JPEG or "
                        "TIFF); remove it or move it out of the class folder"
                    )
                out.append(os.path.relpath(path, self.root).replace(os.sep, "/"))
        if not out:
            raise DatasetError(
                f"cell_folder: the class folder {folder} holds no images; add its images or "
                "remove the folder (and the class from the taxonomy file)"
            )
        return out

    def _warn_small_classes(self, refs: list[CellRef]) -> None:
        for label, cls in enumerate(self.taxonomy.class_names):
            mine = [r for r in refs if r.label == label]
            n_groups = len({r.group_id for r in mine})
            if n_groups < NUM_FOLDS:
                self._warn(
                    f"cell_folder: class {cls!r} has {len(mine)} image(s) in {n_groups} "
                    f"group(s), fewer than the {NUM_FOLDS} folds: stratified folds are "
                    "impossible, some test folds will hold none of it and its test figures "
                    "mean little; add images of it"
                )

    def config_name(self, refs: list[CellRef], fold_config: str) -> str:
        """The TFDS builder config of this folder: `<fold config>-<12 hex digits>`.

        Different lab folders, rules or taxonomies must not share one build in a data_dir,
        and a folder that changed must not reuse a stale one: the digest covers every cell
        (file name, group, label, size, modification time), the taxonomy and the fold config.
        """
        h = hashlib.sha256()
        h.update(json.dumps([fold_config, self.taxonomy.to_dict()], sort_keys=True).encode())
        for r in refs:
            st = os.stat(os.path.join(self.root, *r.file_name.split("/")))
            h.update(
                json.dumps([r.file_name, r.group_id, r.label, st.st_size, st.st_mtime_ns]).encode()
            )
        return f"{fold_config}-{h.hexdigest()[:12]}"

    def load_cell(self, ref: CellRef) -> dict:
        from sipak_jax import preprocessing  # noqa: PLC0415 - cv2 + numpy; the one image reader

        path = os.path.join(self.root, *ref.file_name.split("/"))
        try:
            image = preprocessing.read_image(path)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cell_folder: {e}") from None
        return {
            "image": image,
            "label": ref.label,
            "file_name": ref.file_name,
            "group_id": ref.group_id,
        }


# ---- Grouping ----------------------------------------------------------------------------------


def _grouping_rule(options: Mapping) -> dict:
    """{'rule': 'regex'|'csv'|'none', 'value', 'leak_free', 'warning'} from the options."""
    regex, table = options.get("group_regex") or "", options.get("group_csv") or ""
    if regex and table:
        raise DatasetError(
            "cell_folder: give one grouping rule, config.group_regex or config.group_csv, not both"
        )
    if regex:
        try:
            re.compile(regex)
        except re.error as e:
            raise DatasetError(f"config.group_regex={regex!r} is not a valid regex: {e}") from None
        return {"rule": "regex", "value": regex, "leak_free": True, "warning": ""}
    if table:
        path = os.path.abspath(os.path.expanduser(table))
        if not os.path.isfile(path):
            raise DatasetError(f"config.group_csv={table}: no such file (columns file,group)")
        return {"rule": "csv", "value": path, "leak_free": True, "warning": ""}
    return {
        "rule": "none",
        "value": "",
        "leak_free": False,
        "warning": (
            "cell_folder: no grouping rule (config.group_regex or config.group_csv): every "
            "file is its own group, so cells of one slide can sit in both the training and the "
            "test folds and the test figures may be optimistic; the protocol is NOT leak-free"
        ),
    }


def _group_ids(grouping: dict, root: str, files: list[str]) -> dict[str, str]:
    if grouping["rule"] == "regex":
        return _regex_groups(grouping["value"], files)
    if grouping["rule"] == "csv":
        return _csv_groups(grouping["value"], files)
    return {f: f for f in files}


def _regex_groups(regex: str, files: list[str]) -> dict[str, str]:
    pattern, out = re.compile(regex), {}
    for f in files:
        stem = os.path.splitext(f.rsplit("/", 1)[-1])[0]
        m = pattern.search(stem)
        group = (m.group(1) if m.groups() else m.group(0)) if m else None
        if not group:
            raise DatasetError(
                f"cell_folder: config.group_regex={regex!r} does not match {f} (tried on "
                f"{stem!r}, the file name without its extension); fix the regex or the file name"
            )
        out[f] = group
    return out


def _read_csv(path: str) -> list[tuple[int, str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"config.group_csv={path}: cannot read it ({e})") from None
    if not rows or not {"file", "group"} <= set(header):
        raise DatasetError(
            f"config.group_csv={path}: expected a header with the columns file,group and one "
            f"row per image (found columns {list(header)})"
        )
    return [
        (n, (r["file"] or "").strip(), (r["group"] or "").strip())
        for n, r in enumerate(rows, start=2)
    ]


def _csv_groups(path: str, files: list[str]) -> dict[str, str]:
    by_base: dict[str, list[str]] = {}
    for f in files:
        by_base.setdefault(f.rsplit("/", 1)[-1], []).append(f)
    known, out = set(files), {}
    for line, name, group in _read_csv(path):
        key = name.replace("\\", "/")
        if key not in known:
            hits = by_base.get(key, [])
            if len(hits) > 1:
                raise DatasetError(
                    f"config.group_csv={path}, line {line}: {name!r} names {len(hits)} files "
                    f"({', '.join(hits[:3])}); write the path under ROOT (Class/file)"
                )
            if not hits:
                continue  # a CSV may list more files than the folder holds
            key = hits[0]
        if not group:
            raise DatasetError(f"config.group_csv={path}, line {line}: empty group for {name!r}")
        if out.setdefault(key, group) != group:
            raise DatasetError(
                f"config.group_csv={path}, line {line}: {name!r} is given two groups "
                f"({out[key]!r} and {group!r})"
            )
    missing = [f for f in files if f not in out]
    if missing:
        raise DatasetError(
            f"config.group_csv={path} gives no group for {len(missing)} image(s), e.g. "
            f"{', '.join(missing[:3])}; add a row file,group for each"
        )
    return out


# ---- Taxonomy ------------------------------------------------------------------------------------


def load_taxonomy(path: str, folders: list[str]) -> Taxonomy:
    """The taxonomy file at `path` checked against the class `folders`; without a path, the
    folders (sorted) with no clinical meaning. DatasetError names the file and the field."""
    if not path:
        return Taxonomy.bare(sorted(folders), NAME)
    path = os.path.abspath(os.path.expanduser(path))
    where = f"config.taxonomy={path}"
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except OSError as e:
        raise DatasetError(f"{where}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{where}: expected a JSON object with at least 'abnormal'")
    if "abnormal" not in d:
        raise DatasetError(
            f"{where}: the field 'abnormal' is required (the class names counted abnormal; "
            "[] when none is)"
        )
    _check_classes(where, d.get("class_names"), folders)
    d = {"class_names": sorted(folders), "dataset": NAME, **d}
    try:
        tax = Taxonomy.from_dict(d)
    except ValueError as e:
        raise DatasetError(f"{where}: {e}") from None
    return tax


def _check_classes(where: str, class_names, folders: list[str]) -> None:
    """The taxonomy's `class_names` (when given as a list) are exactly the class folders."""
    if not isinstance(class_names, list):
        return
    extra = [c for c in class_names if c not in folders]
    missing = [c for c in folders if c not in class_names]
    if extra or missing:
        raise DatasetError(
            f"{where}: its class_names and the class folders differ: classes without a folder "
            f"{extra}, folders that are not classes {missing}"
        )
