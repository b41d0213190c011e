"""IPTC records written the way Photoshop writes them into a JPEG, for inputs: Pillow reads IPTC
but writes none, and isosr's own writer (pipeline.images) must not be the only judge of itself."""

from __future__ import annotations

import struct


def with_iptc(jpeg: bytes, keywords: list[bytes]) -> bytes:
    """`jpeg` with IPTC keywords (record 2, dataset 25) in an APP13 "Photoshop 3.0" block right after
    SOI: resource 0x0404, an empty name, the records, padded to an even length."""
    iptc = b"".join(b"\x1c\x02\x19" + struct.pack(">H", len(k)) + k for k in keywords)
    body = b"Photoshop 3.0\0" + b"8BIM\x04\x04\0\0" + struct.pack(">I", len(iptc)) + iptc + b"\0" * (len(iptc) % 2)
    return jpeg[:2] + b"\xff\xed" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]
