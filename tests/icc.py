"""ICC profiles made by hand, for inputs: Pillow's ImageCms makes only sRGB, Lab and XYZ profiles,
and the tests download nothing. LittleCMS (ImageCms) reads them as it reads any profile."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import skimage.color

D50 = struct.pack(">3i", 63190, 65536, 54061)  # the ICC's white, s15Fixed16


def profile(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    """An ICC v2 profile with these header fields and tags (ICC.1:2001-04, 6)."""
    offset, table, body = 128 + 4 + 12 * len(tags), struct.pack(">I", len(tags)), b""
    for signature, data in tags.items():
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = struct.pack(">I", offset + len(body)) + bytes(4) + bytes([2, 0x10, 0, 0]) + device_class + space + pcs
    header += bytes(12) + b"acsp" + bytes(28) + D50
    return header + bytes(128 - len(header)) + table + body


def press_profile() -> bytes:
    """A CMYK printer profile whose inks are not Pillow's plain ones: a lut16 from CMYK to Lab of 2
    grid points a channel, the corners those of R = (1 - C)(1 - K), ..., on a warm, grey paper."""
    corners = [
        [(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)] for c, m, y, k in itertools.product((0, 1), repeat=4)
    ]
    lab = skimage.color.rgb2lab(np.array(corners, float)[None])[0] * (0.9, 1, 1) + (5, 3, 15)
    clut = b"".join(
        struct.pack(">3H", round(L / 100 * 0xFF00), round((a + 128) * 256), round((b + 128) * 256)) for L, a, b in lab
    )
    identity = struct.pack(">9i", *np.eye(3, dtype=int).ravel() * 65536)
    lut = b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + identity + struct.pack(">HH", 2, 2)
    lut += struct.pack(">8H", *[0, 65535] * 4) + clut + struct.pack(">6H", *[0, 65535] * 3)
    return profile(b"prtr", b"CMYK", b"Lab ", {b"A2B0": lut, b"wtpt": b"XYZ " + bytes(4) + D50})


def grey_profile() -> bytes:
    """A grey display profile: gamma 2.2."""
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256))
    return profile(b"mntr", b"GRAY", b"XYZ ", {b"kTRC": curve, b"wtpt": b"XYZ " + bytes(4) + D50})
