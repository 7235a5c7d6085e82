"""SIPaKMeD behind the dataset registry's `Reader` interface (`tfds_sipakmed.datasets`).

A thin wrapper of `tfds_sipakmed.layout`: the same cells, files, checks and errors (its
`SipakmedError` is a `datasets.DatasetError`), with `group_id` = the cluster image
`<Class>/NNN`. The examples keep SIPaKMeD's own keys (`label_3class`, `label_2class`,
`cell_index`, the contours, `annotation_issue`) beside the common schema, with texts as `str`.
Archives in the manual dir are checked and their CROPPED/ members extracted into a temporary
dir that lives as long as the reader (or into `options["extract_dir"]`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

from tfds_sipakmed import layout
from tfds_sipakmed.datasets import CellRef, log_of
from tfds_sipakmed.taxonomy import SIPAKMED


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class SipakmedReader:
    """SIPaKMeD's manual dir: the five archives or their extracted `im_<Class>/` folders."""

    name = "sipakmed"
    taxonomy = SIPAKMED

    def __init__(self, manual_dir, options: Mapping | None = None):
        options = dict(options or {})
        self.manual_dir = os.fspath(manual_dir)
        self._log = log_of(options)
        self._checksums = options.get("archive_checksums")
        self._extract_dir = options.get("extract_dir")
        self._scratch = None
        self._sources = layout.find_sources(self.manual_dir)

    def _extract_to(self) -> str | None:
        if not any(s.kind == "archive" for s in self._sources.values()):
            return None
        if self._extract_dir is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="sipakmed_extract_")
            self._extract_dir = self._scratch.name
        return self._extract_dir

    def list_cells(self) -> list[CellRef]:
        refs = layout.list_cells(self.manual_dir, self._extract_to(), self._checksums, self._log)
        return [CellRef(r.file_name, r.cluster_id, r.label, (r,)) for r in refs]

    def load_cell(self, ref: CellRef) -> dict:
        return to_common(layout.load_cell(ref.extra[0]))


def to_common(ex: dict) -> dict:
    """A SIPaKMeD example (layout or TFDS keys) in the common schema: texts as `str`, its
    `cluster_id` as `group_id`; the other keys are kept."""
    out = dict(ex)
    out["group_id"] = _text(out.pop("cluster_id"))
    out["file_name"] = _text(out["file_name"])
    if "annotation_issue" in out:
        out["annotation_issue"] = _text(out["annotation_issue"])
    return out
