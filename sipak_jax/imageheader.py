"""An image file's format and pixel dimensions from its header alone, before any decoding.

`dimensions(data) -> (format, width, height)` reads the first bytes of a PNG, JPEG, BMP or TIFF
file (standard library only, nothing is decompressed), so that a decompression bomb (a small
file that decodes to gigabytes: a 30,000 x 30,000 PNG of zeros is 900 kB) is refused before
OpenCV allocates anything. It returns None for any other content (text, WebP, a truncated
header): callers treat that as "not an image we decode". TIFF: the first image (IFD 0), which is
what `cv2.imdecode` reads.
"""

from __future__ import annotations

import struct

FORMATS = ("png", "jpeg", "bmp", "tiff")

# JPEG start-of-frame markers (all SOFn but DHT C4, JPG C8, DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png(data: bytes):
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def _jpeg(data: bytes):
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        i += 2 + length
    return None


def _bmp(data: bytes):
    if len(data) < 26:
        return None
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        w, h = struct.unpack("<HH", data[18:22])
    else:
        w, h = struct.unpack("<ii", data[18:26])
    return abs(w), abs(h)  # a negative height is a top-down bitmap


def _tiff(data: bytes):
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", data[2:4])
    if version == 42:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        count_fmt, entry_size, head = "H", 12, 2
    elif version == 43 and len(data) >= 16:  # BigTIFF
        (ifd,) = struct.unpack(order + "Q", data[8:16])
        count_fmt, entry_size, head = "Q", 20, 8
    else:
        return None
    if ifd + head > len(data):
        return None
    (count,) = struct.unpack(order + count_fmt, data[ifd : ifd + head])
    sizes = {}
    for k in range(min(count, 4096)):
        at = ifd + head + k * entry_size
        if at + entry_size > len(data):
            break
        tag, typ = struct.unpack(order + "HH", data[at : at + 4])
        if tag in (256, 257):
            value_at = at + (4 + (8 if version == 43 else 4))
            fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)
            if fmt is None:
                return None
            (sizes[tag],) = struct.unpack(
                order + fmt, data[value_at : value_at + struct.calcsize(fmt)]
            )
    if 256 in sizes and 257 in sizes:
        return sizes[256], sizes[257]
    return None


def sniff(data: bytes) -> str | None:
    """The format of `data` from its signature: one of `FORMATS`, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None


def dimensions(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from the header of a PNG, JPEG, BMP or TIFF file; None when
    `data` is none of them or its header is cut short."""
    fmt = sniff(data)
    if fmt is None:
        return None
    reader = {"png": _png, "jpeg": _jpeg, "bmp": _bmp, "tiff": _tiff}[fmt]
    try:
        size = reader(bytes(data))
    except struct.error:
        return None
    return None if size is None else (fmt, int(size[0]), int(size[1]))
