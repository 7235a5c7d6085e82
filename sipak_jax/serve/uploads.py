"""Uploads: a multipart body read in memory under limits, zip archives opened under limits.

Nothing here touches the file system: parts are held as bytes (the body is streamed and
counted, so a request over `Limits.max_request_bytes` is refused before it is all read), zip
archives are read from memory, and a name from the request is only ever a label in a row.

- `Limits`: what one request may hold (bytes, parts, zip entries, zip content, pixels).
- `read_multipart(chunks, content_type, limits) -> list[Part]`: the parts of a
  `multipart/form-data` body from an async iterator of chunks; `UploadError` (with the HTTP
  status) for a body over the limits or not multipart.
- `expand(parts, limits) -> (items, skipped)`: the files to classify, in the order sent; a
  zip (by name or signature) becomes its image entries (`archive.zip/inner/name.png`), in
  archive order. An unsafe entry (absolute, `..`, a drive), an archive over the limits or not
  readable, becomes an error item; junk (`__MACOSX/`, `._*`, entries without an image
  extension) is listed in `skipped`.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import zipfile
from collections.abc import AsyncIterator

from sipak_jax.imageio import is_image_file

MB = 1024 * 1024


def size_text(n: int) -> str:
    """'256 MB' or '65,536 bytes'."""
    return f"{n / MB:g} MB" if n >= MB else f"{n:,} bytes"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits (the server's flags)."""

    max_request_bytes: int = 256 * MB
    max_files: int = 256  # parts named `files` in one request
    max_file_bytes: int = 64 * MB  # one image, sent or inside a zip
    max_pixels: int = 40_000_000  # width x height from the header, before decoding
    max_zip_entries: int = 2000
    max_zip_bytes: int = 512 * MB  # the declared uncompressed size of all entries

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class UploadError(Exception):
    """A request refused as a whole: `status` (HTTP) and a message saying which limit."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Part:
    name: str
    filename: str | None
    data: bytes


@dataclasses.dataclass
class Item:
    """One file to classify: `data`, or `error` when it cannot even be handed to the decoder."""

    name: str
    data: bytes | None = None
    error: str | None = None


def _boundary(content_type: str) -> bytes:
    from python_multipart.multipart import parse_options_header

    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError(415, "send the files as multipart/form-data (parts named `files`)")
    return params[b"boundary"]


class _Collector:
    """python-multipart callbacks that gather parts in memory, counting them."""

    def __init__(self, limits: Limits):
        self.limits, self.parts, self.ended = limits, [], False
        self._field, self._value, self._headers = b"", b"", {}
        self._data: list[bytes] = []
        self._size = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_part_data": self._part_data,
            "on_part_end": self._end,
            "on_header_field": lambda d, s, e: setattr(self, "_field", self._field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self._header_end,
            "on_end": lambda: setattr(self, "ended", True),
        }

    def _begin(self):
        self._headers, self._data, self._size = {}, [], 0
        if len(self.parts) >= self.limits.max_files + 8:  # a few form fields besides files
            raise UploadError(
                413, f"more than {self.limits.max_files} files in one request; send fewer"
            )

    def _header_end(self):
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _part_data(self, data, start, end):
        self._size += end - start
        if self._size > self.limits.max_file_bytes:
            raise UploadError(
                413, f"a part is larger than {size_text(self.limits.max_file_bytes)}; send less"
            )
        self._data.append(bytes(data[start:end]))

    def _end(self):
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        filename = None if filename is None else filename.decode("utf-8", "replace")
        self.parts.append(Part(name, filename, b"".join(self._data)))
        self._data = []


async def read_multipart(
    chunks: AsyncIterator[bytes], content_type: str, limits: Limits
) -> list[Part]:
    """The parts of a multipart body (module docstring). Raises UploadError."""
    from python_multipart.multipart import MultipartParser

    collector = _Collector(limits)
    parser = MultipartParser(_boundary(content_type), collector.callbacks())
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limits.max_request_bytes:
            raise UploadError(
                413, f"the request is larger than {size_text(limits.max_request_bytes)}; split it"
            )
        try:
            parser.write(chunk)
        except UploadError:
            raise
        except Exception as e:  # noqa: BLE001 - python-multipart's parse errors
            raise UploadError(400, f"malformed multipart body: {e}") from None
    parser.finalize()
    if not collector.ended:
        raise UploadError(400, "the multipart body is cut short (no closing boundary)")
    files = [p for p in collector.parts if p.name == "files"]
    if len(files) > limits.max_files:
        raise UploadError(
            413, f"{len(files)} files in one request, the limit is {limits.max_files}"
        )
    return collector.parts


def _unsafe(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    drive = len(name) > 1 and name[1] == ":"
    return name.startswith(("/", "\\")) or drive or ".." in parts or "\x00" in name


def _junk(name: str) -> bool:
    base = posixpath.basename(name)
    return name.startswith("__MACOSX/") or base.startswith("._") or not is_image_file(base)


def is_zip(name: str | None, data: bytes) -> bool:
    return (name or "").lower().endswith(".zip") or data[:4] == b"PK\x03\x04"


def _zip_items(label: str, data: bytes, limits: Limits) -> tuple[list[Item], list[str]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return [Item(label, error=f"{label}: not a readable zip archive ({e})")], []
    if len(infos) > limits.max_zip_entries:
        msg = f"{label}: {len(infos)} entries, more than the limit of {limits.max_zip_entries}"
        return [Item(label, error=msg)], []
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_zip_bytes:
        msg = (
            f"{label}: its entries unpack to {declared:,} bytes, more than the limit of "
            f"{limits.max_zip_bytes:,} (a zip bomb?); nothing was unpacked"
        )
        return [Item(label, error=msg)], []
    items, skipped = [], []
    for info in infos:
        name = f"{label}/{info.filename}"
        if _unsafe(info.filename):
            items.append(Item(name, error=f"{name}: unsafe path in the zip archive; not read"))
        elif _junk(info.filename):
            skipped.append(name)
        elif info.file_size > limits.max_file_bytes:
            items.append(Item(name, error=f"{name}: larger than {limits.max_file_bytes:,} bytes"))
        else:
            try:
                items.append(Item(name, data=archive.read(info)))
            except (zipfile.BadZipFile, RuntimeError, OSError, ValueError, EOFError) as e:
                items.append(Item(name, error=f"{name}: cannot be unpacked ({e})"))
            except Exception as e:  # noqa: BLE001 - e.g. zlib.error: report, go on
                items.append(Item(name, error=f"{name}: cannot be unpacked ({e})"))
    return items, skipped


def expand(parts: list[Part], limits: Limits) -> tuple[list[Item], list[str]]:
    """The files to classify from the `files` parts (module docstring)."""
    items: list[Item] = []
    skipped: list[str] = []
    for k, part in enumerate(p for p in parts if p.name == "files"):
        label = part.filename or f"file{k + 1}"
        if part.data and is_zip(part.filename, part.data):
            more, skip = _zip_items(label, part.data, limits)
            items.extend(more)
            skipped.extend(skip)
        else:
            items.append(Item(label, data=part.data))
    return items, skipped
