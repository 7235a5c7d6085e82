"""Reading a SIPaKMeD manual dir without TensorFlow: find the classes, parse contours, read BMPs.

A manual dir holds, for each of the five classes, either the official archive
`im_<Class>.7z` (its sha256 is checked against the published one) or the extracted folder,
flat `im_<Class>/CROPPED/...` or doubly nested `im_<Class>/im_<Class>/CROPPED/...` (as some
mirrors ship it), in any mix. The examples are exactly the cropped cells
`CROPPED/NNN_KK.bmp` with their crop-level contours `NNN_KK_cyt.dat` / `NNN_KK_nuc.dat`;
cluster images (`im_<Class>/NNN.bmp`) are never read.

The TFDS builder and the TF-free input path both go through `list_cells` + `load_cell`
(`iter_cells` chains them), so both see the same examples with the same values.

Needs numpy, OpenCV and the standard library (py7zr only for `.7z` archives).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from tfds_sipakmed.datasets import DatasetError
from tfds_sipakmed.taxonomy import SIPAKMED

DOWNLOAD_PAGE = "https://www.cs.uoi.gr/~marina/sipakmed.html"
PUBLISHED_COUNTS = {
    "Dyskeratotic": 813,
    "Koilocytotic": 825,
    "Metaplastic": 793,
    "Parabasal": 787,
    "Superficial-Intermediate": 831,
}
ARCHIVE_NAMES = tuple(f"im_{c}.7z" for c in SIPAKMED.class_names)
CHECKSUMS_TSV = os.path.join(os.path.dirname(__file__), "sipakmed", "checksums.tsv")
ENV_ARCHIVE_CHECKSUMS = "SIPAKMED_ARCHIVE_CHECKSUMS"

# Annotation checks: a nucleus is "outside" the crop / the cell when more than this fraction
# of its area lies outside.
OUTSIDE_FRACTION = 0.1

_CROP_RE = re.compile(r"^(\d{3})_(\d{2})\.bmp$", re.IGNORECASE)
_DAT_RE = re.compile(r"^(\d{3})_(\d{2})_(cyt|nuc)\.dat$", re.IGNORECASE)
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VERTEX_RE = re.compile(rf"^\s*({_NUMBER})\s*,\s*({_NUMBER})\s*$")


class SipakmedError(DatasetError):
    """Bad or missing SIPaKMeD input; the message names the file and says what to do."""


def _missing_help() -> str:
    return (
        f"Download the five archives ({', '.join(ARCHIVE_NAMES)}) from {DOWNLOAD_PAGE} and put "
        "them (or their extracted im_<Class>/ folders) directly in the manual dir."
    )


# --------------------------------------------------------------------------------------------
# Checksums


def published_checksums() -> dict[str, tuple[int, str]]:
    """{archive name: (size in bytes, sha256)} from `sipakmed/checksums.tsv` (TFDS format)."""
    out = {}
    with open(CHECKSUMS_TSV) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                url, size, sha, *_ = line.rstrip("\n").split("\t")
                out[url.rsplit("/", 1)[-1]] = (int(size), sha)
    return out


def read_checksums_file(path: str) -> dict[str, str]:
    """{archive name: sha256} from a `sha256sum`-style file (`<hex>  <name>` per line)."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
                raise SipakmedError(
                    f"{path}, line {n}: expected '<sha256>  <archive name>', got {line!r}"
                )
            out[os.path.basename(parts[1].lstrip("*"))] = parts[0].lower()
    return out


def resolve_checksums(archive_checksums=None) -> dict[str, str]:
    """The sha256 each archive must have: the published ones, or an explicit override.

    `archive_checksums` (or, when it is None, the file named by the environment variable
    SIPAKMED_ARCHIVE_CHECKSUMS) replaces the published sums for the archives it names: a
    mapping {name: sha256} or the path of a `sha256sum`-style file such as the
    `SYNTHETIC_SHA256SUMS` that `tfds_sipakmed.synthetic --archives` writes. This is the only
    way to build from archives other than the published ones; there is no "skip" switch.
    """
    sums = {name: sha for name, (_, sha) in published_checksums().items()}
    if archive_checksums is None:
        archive_checksums = os.environ.get(ENV_ARCHIVE_CHECKSUMS) or None
    if archive_checksums is None:
        return sums
    if isinstance(archive_checksums, str | os.PathLike):
        override = read_checksums_file(os.fspath(archive_checksums))
    else:
        override = {k: str(v).lower() for k, v in dict(archive_checksums).items()}
    unknown = sorted(set(override) - set(sums))
    if unknown:
        raise SipakmedError(
            f"archive_checksums names unknown archives {unknown}; expected some of "
            f"{list(ARCHIVE_NAMES)}"
        )
    sums.update(override)
    return sums


def polygon_area(pts: np.ndarray) -> float:
    """Absolute shoelace area of a polygon given as [N, 2] (x, y); winding does not matter."""
    pts = np.asarray(pts, np.float64)
    if len(pts) < 3:
        return 0.0
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_archive(path: str, checksums: Mapping[str, str]) -> None:
    """Raises SipakmedError naming the archive when its sha256 is not the expected one."""
    name = os.path.basename(path)
    got = sha256_file(path)
    want = checksums[name]
    if got != want:
        raise SipakmedError(
            f"{path}: sha256 {got} differs from the expected {want} "
            f"(size {os.path.getsize(path)} bytes). The archive is incomplete or not the "
            f"published one: download it again from {DOWNLOAD_PAGE}. For archives you made "
            "yourself (e.g. the synthetic ones), pass their sums explicitly with "
            f"archive_checksums= / --archive_checksums=FILE or ${ENV_ARCHIVE_CHECKSUMS}."
        )


# --------------------------------------------------------------------------------------------
# Finding the classes


@dataclass(frozen=True)
class ClassSource:
    """Where one class lives in the manual dir: an archive, or the folder holding CROPPED/."""

    class_name: str
    kind: str  # 'archive' or 'folder'
    path: str  # the .7z file, or the directory that contains CROPPED/


def find_sources(manual_dir: str) -> dict[str, ClassSource]:
    """Locates every class's archive or folder in `manual_dir`; errors name what is missing."""
    manual_dir = os.fspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise SipakmedError(f"The manual dir {manual_dir} does not exist. {_missing_help()}")
    entries = os.listdir(manual_dir)
    if not entries:
        raise SipakmedError(f"The manual dir {manual_dir} is empty. {_missing_help()}")
    sources, missing = {}, []
    for cls in SIPAKMED.class_names:
        folder = os.path.join(manual_dir, f"im_{cls}")
        archive = folder + ".7z"
        has_folder, has_archive = os.path.isdir(folder), os.path.isfile(archive)
        if has_folder and has_archive:
            raise SipakmedError(
                f"{manual_dir} holds both {archive} and the folder {folder}; keep only one of "
                "them (move the other away) so that it is clear which copy to build from."
            )
        if has_archive:
            sources[cls] = ClassSource(cls, "archive", archive)
        elif has_folder:
            for root in (folder, os.path.join(folder, f"im_{cls}")):
                if os.path.isdir(os.path.join(root, "CROPPED")):
                    sources[cls] = ClassSource(cls, "folder", root)
                    break
            else:
                raise SipakmedError(
                    f"{folder} has no CROPPED/ folder (looked for {folder}/CROPPED and "
                    f"{folder}/im_{cls}/CROPPED). Extract {os.path.basename(archive)} again "
                    f"from {DOWNLOAD_PAGE}."
                )
        else:
            missing.append(cls)
    if missing:
        names = ", ".join(f"im_{c}.7z" for c in missing)
        raise SipakmedError(
            f"The manual dir {manual_dir} lacks class(es) {', '.join(missing)}: neither "
            f"{names} nor the extracted im_<Class>/ folder(s) are there (found: "
            f"{', '.join(sorted(entries)[:10])}). {_missing_help()}"
        )
    return sources


# --------------------------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class CellRef:
    """One cropped cell on disk: its files and its identity."""

    class_name: str
    cluster: str  # 'NNN'
    cell_index: int  # KK
    file_name: str  # canonical 'im_<Class>/CROPPED/NNN_KK.bmp', the same for every layout
    bmp_path: str
    cyt_path: str
    nuc_path: str

    @property
    def cluster_id(self) -> str:
        return f"{self.class_name}/{self.cluster}"

    @property
    def label(self) -> int:
        return SIPAKMED.class_names.index(self.class_name)


def _scan_cropped(cls: str, cropped: str, warn: Callable[[str], None]) -> list[CellRef]:
    crops, dats, other = {}, {}, []
    for name in sorted(os.listdir(cropped)):
        path = os.path.join(cropped, name)
        if os.path.isdir(path):
            other.append(name)
        elif m := _CROP_RE.match(name):
            crops[(m[1], m[2])] = path
        elif m := _DAT_RE.match(name):
            dats[(m[1], m[2], m[3].lower())] = path
        else:
            other.append(name)
    if not crops:
        raise SipakmedError(
            f"{cropped} holds no cropped cells (NNN_KK.bmp). Extract im_{cls}.7z again from "
            f"{DOWNLOAD_PAGE}."
        )
    refs = []
    for (cluster, kk), bmp in crops.items():
        paths = {}
        for part in ("cyt", "nuc"):
            p = dats.pop((cluster, kk, part), None)
            if p is None:
                raise SipakmedError(
                    f"{os.path.join(cropped, f'{cluster}_{kk}_{part}.dat')} is missing: every "
                    f"crop {cluster}_{kk}.bmp needs its _cyt.dat and _nuc.dat. Extract "
                    f"im_{cls}.7z again from {DOWNLOAD_PAGE}."
                )
            paths[part] = p
        refs.append(
            CellRef(
                class_name=cls,
                cluster=cluster,
                cell_index=int(kk),
                file_name=f"im_{cls}/CROPPED/{cluster}_{kk}.bmp",
                bmp_path=bmp,
                cyt_path=paths["cyt"],
                nuc_path=paths["nuc"],
            )
        )
    ignored = other + [os.path.basename(p) for p in dats.values()]
    if ignored:
        warn(
            f"warning: {cropped}: ignoring {len(ignored)} file(s) that are not NNN_KK.bmp crops "
            f"or their contours: {', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''}"
        )
    return refs


def _extract_archive(source: ClassSource, extract_dir: str, warn) -> str:
    """Extracts only the CROPPED/ members of a class archive; returns the CROPPED dir."""
    import py7zr  # lazily: only archives need it

    cls = source.class_name
    try:
        with py7zr.SevenZipFile(source.path, "r") as z:
            names = z.getnames()
            parents = sorted(
                {
                    n.rsplit("/", 1)[0]
                    for n in names
                    if "/" in n and n.rsplit("/", 1)[0].split("/")[-1].upper() == "CROPPED"
                }
            )
            if len(parents) != 1:
                raise SipakmedError(
                    f"{source.path}: expected exactly one CROPPED/ folder inside, found "
                    f"{parents or 'none'}. Download im_{cls}.7z again from {DOWNLOAD_PAGE}."
                )
            targets = [
                n
                for n in names
                if n.startswith(parents[0] + "/") and n.count("/") == 1 + parents[0].count("/")
            ]
            out = os.path.join(extract_dir, f"im_{cls}")
            os.makedirs(out, exist_ok=True)
            z.extract(path=out, targets=targets)
    except py7zr.exceptions.ArchiveError as e:  # corrupt or not a 7z file
        raise SipakmedError(
            f"{source.path}: cannot read the 7-Zip archive ({e}). Download it again from "
            f"{DOWNLOAD_PAGE}."
        ) from e
    return os.path.join(out, parents[0])


def list_cells(
    manual_dir: str,
    extract_dir: str | None = None,
    archive_checksums=None,
    log: Callable[[str], None] = print,
) -> list[CellRef]:
    """Every cropped cell in `manual_dir`, sorted by `file_name`.

    Archives are checked (sha256, see `resolve_checksums`) and their CROPPED/ members are
    extracted under `extract_dir` (required when the manual dir holds archives; the caller
    owns and removes it). `log` receives progress lines and warnings.
    """
    sources = find_sources(manual_dir)
    sums = None
    refs = []
    for cls, src in sources.items():
        if src.kind == "archive":
            if extract_dir is None:
                raise ValueError("list_cells needs extract_dir when the manual dir has archives")
            if sums is None:
                sums = resolve_checksums(archive_checksums)
            log(f"  {cls}: checking and extracting {src.path} ...")
            verify_archive(src.path, sums)
            cropped = _extract_archive(src, extract_dir, log)
        else:
            cropped = os.path.join(src.path, "CROPPED")
        refs.extend(_scan_cropped(cls, cropped, log))
    refs.sort(key=lambda r: r.file_name)
    return refs


# --------------------------------------------------------------------------------------------
# Files


def parse_dat(text: str, source: str = "<string>") -> np.ndarray:
    """Parses `.dat` contour text (`x,y` per line) into float32 [N, 2]; empty text -> [0, 2].

    Blank lines and CRLF endings are tolerated; anything else that is not two finite numbers
    separated by a comma raises SipakmedError naming `source` and the line.
    """
    pts = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        m = _VERTEX_RE.match(line)
        if not m:
            raise SipakmedError(
                f"{source}, line {n}: expected 'x,y' (two numbers separated by a comma), got "
                f"{line.strip()!r}. The contour file is damaged: extract it again from the "
                "official archive."
            )
        x, y = float(m[1]), float(m[2])
        if not (math.isfinite(x) and math.isfinite(y)):
            raise SipakmedError(f"{source}, line {n}: non-finite vertex {line.strip()!r}")
        pts.append((x, y))
    return np.asarray(pts, np.float32).reshape(-1, 2)


def read_dat(path: str) -> np.ndarray:
    """Reads a `.dat` contour file (see `parse_dat`)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise SipakmedError(
            f"{path}: not an ASCII contour file ({e}). Extract it again from the official archive."
        ) from e
    return parse_dat(text, path)


def read_bmp(path: str) -> np.ndarray:
    """Decodes a BMP file to uint8 RGB [H, W, 3]; a truncated or unreadable file is an error."""
    with open(path, "rb") as f:
        data = f.read()
    problem = None
    if len(data) < 54 or data[:2] != b"BM":
        problem = "not a BMP file (no 'BM' header)"
    else:
        declared = int.from_bytes(data[2:6], "little")
        offset = int.from_bytes(data[10:14], "little")
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = abs(int.from_bytes(data[22:26], "little", signed=True))
        bpp = int.from_bytes(data[28:30], "little")
        row = ((abs(width) * bpp + 31) // 32) * 4
        needed = offset + row * height
        compression = int.from_bytes(data[30:34], "little")
        if declared > len(data) or (compression == 0 and needed > len(data)):
            problem = f"truncated ({len(data)} bytes, the header needs {max(declared, needed)})"
    img = None
    if problem is None:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            problem = "OpenCV cannot decode it"
    if problem:
        raise SipakmedError(
            f"{path}: unreadable BMP: {problem}. Extract it again from the official archive."
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _raster(pts: np.ndarray, origin: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    p = np.round((pts - origin) * 4).astype(np.int32)
    cv2.fillPoly(m, [p], 1, shift=2)
    return m.astype(bool)


def check_annotation(cyt: np.ndarray, nuc: np.ndarray, height: int, width: int) -> str:
    """'' when the annotation is usable for masks, else the reason it is not.

    Invalid: a contour with fewer than 3 vertices or no area (empty); a nucleus with more
    than OUTSIDE_FRACTION of its area outside the crop, or outside the cell contour.
    """
    for part, pts in (("cytoplasm", cyt), ("nucleus", nuc)):
        if len(pts) < 3 or polygon_area(np.asarray(pts, np.float64)) < 1.0:
            return f"empty {part} contour"
    lo = np.floor(nuc.min(0)) - 1
    hi = np.ceil(nuc.max(0)) + 2
    shape = (int(hi[1] - lo[1]), int(hi[0] - lo[0]))
    nuc_m = _raster(nuc, lo, shape)
    area = max(int(nuc_m.sum()), 1)
    ys, xs = np.nonzero(nuc_m)
    xs, ys = xs + lo[0], ys + lo[1]
    outside_crop = ((xs < 0) | (ys < 0) | (xs >= width) | (ys >= height)).sum()
    if outside_crop > OUTSIDE_FRACTION * area:
        return "nucleus outside the crop"
    outside_cell = (nuc_m & ~_raster(cyt, lo, shape)).sum()
    if outside_cell > OUTSIDE_FRACTION * area:
        return "nucleus outside the cell"
    return ""


def load_cell(ref: CellRef) -> dict:
    """One example with the TFDS feature keys and the types `as_data_source()` returns.

    Texts are bytes (UTF-8), labels and `cell_index` Python ints, `annotation_valid` a bool,
    `image` uint8 [H, W, 3] RGB, contours float32 [N, 2] (x, y in crop pixels, as in the file).
    """
    image = read_bmp(ref.bmp_path)
    cyt = read_dat(ref.cyt_path)
    nuc = read_dat(ref.nuc_path)
    issue = check_annotation(cyt, nuc, image.shape[0], image.shape[1])
    label = ref.label
    return {
        "image": image,
        "label": label,
        "label_3class": SIPAKMED.view_labels("3class")[label],
        "label_2class": SIPAKMED.view_labels("2class")[label],
        "cluster_id": ref.cluster_id.encode(),
        "cell_index": ref.cell_index,
        "file_name": ref.file_name.encode(),
        "nucleus_contour": nuc,
        "cytoplasm_contour": cyt,
        "annotation_valid": not issue,
        "annotation_issue": issue.encode(),
    }


@contextlib.contextmanager
def _scratch_dir(path: str | None):
    if path is not None:
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="sipakmed_extract_")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def iter_cells(
    manual_dir: str,
    archive_checksums=None,
    extract_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[dict]:
    """Every cell of `manual_dir` as a dict with the TFDS feature keys, in `file_name` order.

    Archives are extracted to a temporary dir (removed when the iterator finishes or is
    closed) unless `extract_dir` is given. Pair with `tfds_sipakmed.folds.assign_folds` to
    get the same folds as the TFDS builder.
    """
    with _scratch_dir(extract_dir) as scratch:
        for ref in list_cells(manual_dir, scratch, archive_checksums, log):
            yield load_cell(ref)


def count_by_class(refs) -> dict[str, int]:
    """{class: number of cells} for CellRefs or example dicts."""
    counts = dict.fromkeys(SIPAKMED.class_names, 0)
    for r in refs:
        counts[r.class_name if isinstance(r, CellRef) else SIPAKMED.class_names[r["label"]]] += 1
    return counts


def count_report(counts: Mapping[str, int]) -> tuple[list[str], list[str]]:
    """(lines of the per-class count table, warnings where counts differ from the published)."""
    lines, warnings = [], []
    for cls in SIPAKMED.class_names:
        n, want = counts.get(cls, 0), PUBLISHED_COUNTS[cls]
        lines.append(f"  {cls:<25} {n:5d} cells (published: {want})")
        if n != want:
            warnings.append(
                f"warning: {cls} has {n} cells, the published dataset has {want}. With the "
                "real data this means missing or extra files: check the download (a synthetic "
                "stand-in differs by design)."
            )
    total = sum(counts.values())
    lines.append(f"  {'total':<25} {total:5d} cells (published: {sum(PUBLISHED_COUNTS.values())})")
    return lines, warnings
