"""Hostile input, property-based (hypothesis, bounded): decoding either gives a usable image or a
DecodeError, never another exception; every image it gives tiles into exactly 4x its size and can be
written with its metadata in every output format (16-bit colour included); tile
plans of absurd sizes still cover every pixel with tiles inside the image."""

from __future__ import annotations

import io
import itertools
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model.tiling import axis_starts, plan_tiles, upscale_array
from pipeline.images import DecodeError, decode, encode, encode_frames, frames_unfit
from tests.iptc import with_iptc

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 4_000_000  # --max-pixels for the fuzzed decodes: a pixel bomb must be refused, not allocated


class Nearest:
    """A TileModel without a network: nearest-neighbour x4, so that only the tiler is exercised."""

    tile_size, scale = 64, 4

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return tiles.repeat(4, axis=2).repeat(4, axis=3)


@st.composite
def images(draw) -> tuple[bytes, tuple[int, int]]:
    """A real encoded image: any size from 1x1 (aspect ratios to 1:300), mode, format; sometimes an
    EXIF rotation, a camera's EXIF, XMP, IPTC, a resolution, PNG text, an ICC profile, transparency,
    or several frames. Returns (bytes, (w, h) as stored)."""
    w = draw(st.integers(1, 300))
    h = draw(st.integers(1, 300)) if draw(st.booleans()) else 1
    if draw(st.booleans()):
        w, h = h, w
    mode = draw(st.sampled_from(["L", "LA", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "RGB;16", "RGBA;16", "LA;16"]))
    if mode in DEEP:
        return deep_colour(draw, mode, w, h), (w, h)
    fmt = draw(st.sampled_from({"L": ["PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF"], "LA": ["PNG", "WEBP", "TIFF"],
                                "RGB": ["PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF"], "RGBA": ["PNG", "WEBP", "TIFF"],
                                "P": ["PNG", "GIF", "BMP", "TIFF"], "I;16": ["PNG", "TIFF"], "CMYK": ["JPEG", "TIFF"],
                                "1": ["PNG", "BMP", "TIFF"]}[mode]))  # fmt: skip
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
    options: dict[str, object] = {}
    if mode == "P" and draw(st.booleans()):
        options["transparency"] = 0
    if fmt in ("JPEG", "WEBP", "PNG", "TIFF") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))  # orientation
        if draw(st.booleans()):  # what a camera writes: make, resolution, the Exif and GPS IFDs, a maker note
            exif.update(
                {0x010F: "Camera", 0x011A: draw(st.floats(0, 1e5)), 0x011B: 72.0, 0x0128: draw(st.integers(1, 3))}
            )
            exif.get_ifd(0x8769).update({0x9003: "2024:05:06 07:08:09", 0xA002: w, 0xA003: h, 0x927C: b"vendor" * 9})
            exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 31.0, 12.5)})
        options["exif"] = exif.tobytes()
    if fmt in ("JPEG", "WEBP") and draw(st.booleans()):
        options["xmp"] = (
            b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
        )
    if fmt in ("PNG", "JPEG", "TIFF", "BMP") and draw(st.booleans()):
        options["dpi"] = (draw(st.floats(1, 2e4)), draw(st.floats(1, 2e4)))
    if fmt == "PNG" and draw(st.booleans()):
        from PIL import PngImagePlugin

        options["pnginfo"] = PngImagePlugin.PngInfo()
        options["pnginfo"].add_text(
            draw(st.sampled_from(["Title", "parameters", "Comment"])), draw(st.text(max_size=40))
        )
    if fmt in ("PNG", "JPEG", "TIFF") and mode in ("RGB", "L") and draw(st.booleans()):
        from PIL import ImageCms

        options["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    if fmt in ("GIF", "TIFF", "WEBP", "PNG") and draw(st.booleans()):
        options.update(save_all=True, append_images=[img.copy()])  # animated / multi-page
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    if fmt == "JPEG" and draw(st.booleans()):
        return with_iptc(buffer.getvalue(), [b"harbour", draw(st.binary(max_size=40))]), (w, h)
    return buffer.getvalue(), (w, h)


DEEP = {"RGB;16": 3, "RGBA;16": 4, "LA;16": 2}  # 16-bit colour, which Pillow reads as 8 bits


def deep_colour(draw, mode: str, w: int, h: int) -> bytes:
    """A 16-bit colour (or grey and alpha) PNG by libpng or colour TIFF by tifffile, as other programs
    write them: any compression and byte order, sometimes an orientation, a resolution, a second page."""
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 65536, (h, w, DEEP[mode]), np.uint16)
    if mode == "LA;16" or draw(st.booleans()):  # Pillow opens no 16-bit grey-and-alpha TIFF
        return imagecodecs.png_encode(pixels, level=draw(st.integers(1, 9)))
    buffer = io.BytesIO()
    options = {
        "photometric": "rgb",
        "extrasamples": ("unassalpha",) if mode != "RGB;16" else None,
        "compression": draw(st.sampled_from([None, "zlib", "lzw"])),
        "extratags": [(0x0112, 3, 1, draw(st.integers(1, 8)), True)] if draw(st.booleans()) else [],
        "resolution": (draw(st.floats(1, 2e4)), draw(st.floats(1, 2e4))) if draw(st.booleans()) else None,
    }
    with tifffile.TiffWriter(buffer, byteorder=draw(st.sampled_from(["<", ">"]))) as tif:
        for _ in range(draw(st.integers(1, 2))):
            tif.write(pixels, **options)
    return buffer.getvalue()


def decodes_or_refuses(data: bytes):
    """decode() gives a usable image or raises DecodeError: any other exception fails the test. An
    image it gives can be written, with the metadata it carries, in every output format."""
    try:
        out = decode(data, name="fuzzed", max_pixels=LIMIT)
    except DecodeError as e:
        assert str(e).startswith("fuzzed: ") and len(str(e)) > len("fuzzed: ")
        return None
    p = out.pixels
    assert p.dtype in (np.uint8, np.uint16) and p.ndim in (2, 3) and min(p.shape[:2]) >= 1
    assert p.ndim == 2 or p.shape[2] in (2, 3, 4)
    metadata = out.metadata.for_output(4 * p.shape[1], 4 * p.shape[0], 4)
    for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "BMP"):
        written = encode(p, fmt, metadata=metadata)
        if fmt == "TIFF" and p.dtype == np.uint16 and p.shape[2:] == (2,):  # a TIFF Pillow cannot open
            assert tifffile.imread(io.BytesIO(written)).shape == p.shape
        else:
            assert decode(written).pixels.shape[:2] == p.shape[:2], fmt
    if len(out.frames) > 1:  # every page or frame, in one file of each format that holds several
        for fmt in ("TIFF", "PNG", "WEBP"):
            if frames_unfit([f.shape[:2] for f in out.frames], fmt) is None:
                frames = decode(encode_frames(list(out.frames), fmt, metadata=metadata)).frames
                # Pillow's animation writers merge a frame identical to the one before into it
                assert len(frames) == len(out.frames) if fmt == "TIFF" else 1 <= len(frames) <= len(out.frames), fmt
    return p


@FUZZ
@given(images())
def test_every_real_image_decodes_and_tiles_to_exactly_four_times_its_size(case) -> None:
    data, (w, h) = case
    pixels = decodes_or_refuses(data)
    assert pixels is not None, "a valid image was refused"
    assert sorted(pixels.shape[:2]) == sorted((h, w))  # EXIF rotation may swap the sides
    out = upscale_array(pixels, Nearest())
    assert out.shape[:2] == (4 * pixels.shape[0], 4 * pixels.shape[1]) and out.dtype == pixels.dtype


@FUZZ
@given(images(), st.data())
def test_truncated_or_corrupted_files_give_a_readable_error_or_an_image(case, data) -> None:
    raw = bytearray(case[0])
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 20))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    pixels = decodes_or_refuses(bytes(raw))
    if pixels is not None:
        assert upscale_array(pixels, Nearest()).shape[0] == 4 * pixels.shape[0]


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise_anything_but_a_decode_error(raw: bytes) -> None:
    decodes_or_refuses(raw)


def png_header(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG that claims width x height but holds almost no data: a pixel bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (2**31 - 1, 2), (1, 100_000_000), (65_535, 65_535)])
def test_pixel_bombs_are_refused_from_the_header_before_any_allocation(width: int, height: int) -> None:
    with pytest.raises(DecodeError, match="raise --max-pixels"):
        decode(png_header(width, height), max_pixels=LIMIT)


@FUZZ
@given(st.integers(1, 1_000_000), st.integers(1, 1_000_000), st.integers(0, 31))
def test_tile_plans_of_any_size_cover_every_pixel_with_tiles_inside(height: int, width: int, halo: int) -> None:
    """1x100000 strips, 1x1, and sizes no decode would allow: the plan alone, no pixels."""
    plan = plan_tiles(height, width, tile=64, halo=halo)
    for length, starts in ((height, plan.ys), (width, plan.xs)):
        extent = max(length, 64)
        assert starts[0] == 0 and starts[-1] + 64 == extent
        assert all(b - a <= 64 - 2 * halo for a, b in itertools.pairwise(starts))  # no gap, the halo kept
        assert list(starts) == axis_starts(length, 64, halo)
    assert len(plan) == len(plan.ys) * len(plan.xs)


def test_a_one_pixel_high_strip_100000_wide_upscales_exactly() -> None:
    strip = np.random.default_rng(0).integers(0, 256, (1, 100_000, 3), dtype=np.uint8)
    out = upscale_array(strip, Nearest())
    assert out.shape == (4, 400_000, 3)
    assert np.array_equal(out[0, ::4], strip[0])  # nearest-neighbour through the tiler: exact
