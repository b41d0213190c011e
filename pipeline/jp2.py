"""The metadata boxes of a JPEG 2000 (JP2) file, which neither Pillow nor OpenJPEG reads or writes.

Pillow reads a JP2's resolution and nothing else that describes the photo, and both its writer and
imagecodecs' (OpenJPEG) write only the pixels. An archive's JP2 scans carry their ICC profile and
XMP in boxes (ISO 15444-1 annex I): a colour box (`colr`, method 2 or 3: an ICC profile) inside the
header box (`jp2h`), and XMP, IPTC and EXIF in `uuid` boxes (the XMP UUID of the XMP specification,
part 3; IPTC's and "JpgTiffExif->JP2" then a TIFF structure, as exiftool writes them; some writers
put "Exif\0\0" first, Adobe's plug-in uses a UUID of its own). A box is a 32-bit length (1: a 64-bit one
follows; 0: to the end of the file), a 4-byte type and its contents, so reading and writing them is
a few lines; no maintained Python library does it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

XMP_UUID = bytes.fromhex("be7acfcb97a942e89c71999491e3afac")
IPTC_UUID = bytes.fromhex("33c7a4d2b81d4723a0baf1a3e097ad38")
EXIF_UUID = b"JpgTiffExif->JP2"
_PHOTOSHOP_EXIF_UUID = bytes.fromhex("0537cdab9d0c4431a72afa561f2a113e")  # Adobe's JPEG 2000 plug-in
_EXIF_HEADER = b"Exif\x00\x00"
_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int, int]]:
    """(type, start of the box, start of its contents, end) of each box in data[start:end]; stops at
    the first box whose length does not fit (a truncated file keeps the boxes before it)."""
    end = len(data) if end is None else end
    at = start
    while at + 8 <= end:
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        header = 8
        if length == 1:
            if at + 16 > end:
                return
            (length,) = struct.unpack(">Q", data[at + 8 : at + 16])
            header = 16
        elif length == 0:
            length = end - at
        if length < header or at + length > end:
            return
        yield kind, at, at + header, at + length
        at += length


def read(data: bytes) -> dict[str, bytes]:
    """What of "icc" (the ICC profile), "xmp", "iptc" and "exif" (a TIFF structure, without
    "Exif\0\0") a JP2 file holds; {} for a bare codestream or no JP2 at all."""
    found: dict[str, bytes] = {}
    if not data.startswith(_SIGNATURE):
        return found
    for kind, _, inside, end in _boxes(data):
        if kind == b"jp2h":
            for inner, _, at, stop in _boxes(data, inside, end):
                if inner == b"colr" and stop - at > 3 and data[at] in (2, 3):
                    found.setdefault("icc", data[at + 3 : stop])  # method, precedence, approximation, profile
        elif kind == b"uuid" and end - inside > 16:
            uuid, contents = data[inside : inside + 16], data[inside + 16 : end]
            if uuid == XMP_UUID:
                found.setdefault("xmp", contents)
            elif uuid == IPTC_UUID:
                found.setdefault("iptc", contents)
            elif uuid in (EXIF_UUID, _PHOTOSHOP_EXIF_UUID):
                found.setdefault("exif", contents.removeprefix(_EXIF_HEADER))
    return found


def without_profile(data: bytes) -> bytes:
    """The JP2 file `data` with an ICC colour box stated as the enumerated colour space instead (sRGB,
    or grey for one or two components), the pixels untouched: OpenJPEG (imagecodecs) converts the
    pixels of a file with a profile into sRGB, where isosr keeps them as stored and carries the profile."""

    def enumerated(inner: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        ihdr = next((_contents(box) for kind, box in inner if kind == b"ihdr" and len(_contents(box)) >= 14), None)
        if ihdr is None or not any(kind == b"colr" and _contents(box)[:1] in (b"\x02", b"\x03") for kind, box in inner):
            return inner
        space = 17 if struct.unpack(">H", ihdr[8:10])[0] <= 2 else 16  # grey, sRGB
        colr = _box(b"colr", b"\x01\x00\x00" + struct.pack(">I", space))
        return [(kind, colr if kind == b"colr" else box) for kind, box in inner]

    return _header_rewritten(data, enumerated)


def _header_rewritten(data: bytes, rewrite: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]],
                      after: bytes = b"") -> bytes:  # fmt: skip
    """The JP2 file `data` with its header box's inner boxes, (type, whole box) each, as `rewrite`
    returns them, and the boxes `after` right after it; a file with no header box comes back unchanged."""
    header = next((b for b in _boxes(data) if b[0] == b"jp2h"), None) if data.startswith(_SIGNATURE) else None
    if header is None:
        return data
    _, start, inside, end = header
    inner = rewrite([(kind, data[at:stop]) for kind, at, _, stop in _boxes(data, inside, end)])
    return data[:start] + _box(b"jp2h", b"".join(box for _, box in inner)) + after + data[end:]


def _box(kind: bytes, contents: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(contents), kind) + contents


def _contents(box: bytes) -> bytes:
    """A whole box's contents: after its 8-byte header, or 16 where its length is a 64-bit one."""
    return box[16:] if box[:4] == b"\x00\x00\x00\x01" else box[8:]


def _resolution(dpi: tuple[float, float]) -> bytes | None:
    """A capture resolution box (`res ` holding `resc`) for `dpi` (horizontal, vertical), or None
    where it cannot hold them. The box holds pixels a metre as numerator / denominator x 10^exponent,
    16-bit each: dpi / 0.0254 = dpi x 5000 / 127, exact for whole dpi up to 13 x 10^exponent."""
    fields = []
    for value in (dpi[1], dpi[0]):  # vertical first
        numerator, exponent = value * 5000, 0
        while numerator > 65535 and exponent < 127:
            numerator, exponent = numerator / 10, exponent + 1
        if not 1 <= round(numerator) <= 65535:
            return None
        fields.append((round(numerator), exponent))
    (vn, ve), (hn, he) = fields
    return _box(b"res ", _box(b"resc", struct.pack(">HHHHbb", vn, 127, hn, 127, ve, he)))


def write(
    data: bytes,
    *,
    icc: bytes | None = None,
    xmp: bytes | None = None,
    iptc: bytes | None = None,
    exif: bytes | None = None,
    dpi: tuple[float, float] | None = None,
) -> bytes:
    """The JP2 file `data` (as Pillow or OpenJPEG writes it) with an ICC profile in its colour box
    (in place of the enumerated colour space), a capture resolution, and XMP, IPTC and EXIF in uuid
    boxes after its header box. A file that is not a JP2 with a header box comes back unchanged."""
    if not (icc or xmp or iptc or exif or dpi):
        return data

    def described(inner: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        inner = [(kind, box) for kind, box in inner if kind != b"res "]
        if icc:
            inner = [(kind, _box(b"colr", b"\x02\x00\x00" + icc) if kind == b"colr" else box) for kind, box in inner]
        if dpi and (resolution := _resolution(dpi)):
            inner.append((b"res ", resolution))
        return inner

    after = _box(b"uuid", XMP_UUID + xmp) if xmp else b""
    if iptc:
        after += _box(b"uuid", IPTC_UUID + iptc)
    if exif:  # the TIFF structure alone, as exiftool reads it
        after += _box(b"uuid", EXIF_UUID + exif.removeprefix(_EXIF_HEADER))
    return _header_rewritten(data, described, after)
