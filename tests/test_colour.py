"""Colour profiles: a CMYK photo (a print scan, a magazine archive's JPEG) is converted into sRGB by
its own ICC profile, as a colour-managed viewer shows it, and its output carries sRGB's profile; an
output never carries a profile of other colours than its pixels'. On the code before, a CMYK JPEG
with its profile came out converted by Pillow's plain formula (R = 255 - C - K) and carrying its
CMYK profile on RGB pixels, which viewers reject: 15 to 21 levels off a colour-managed view on
average, over 100 at worst, with Ghostscript's SWOP press profile (RESULTS.md)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

from pipeline.images import Metadata, decode, encode, encode_frames
from tests.icc import grey_profile, press_profile

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
PRESS = press_profile()


def cmyk_photo(fmt: str, icc: bytes | None, orientation: int = 1) -> bytes:
    cmyk = Image.fromarray(skimage.data.astronaut()[::4, ::4]).convert("CMYK")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    cmyk.save(
        buffer, fmt, exif=exif, **({"icc_profile": icc} if icc else {}), **({"quality": 95} if fmt == "JPEG" else {})
    )
    return buffer.getvalue()


def managed_view(data: bytes) -> np.ndarray:
    """What a colour-managed viewer shows of a CMYK file: LittleCMS from its profile into sRGB, upright."""
    with Image.open(io.BytesIO(data)) as img:
        source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
        upright = ImageOps.exif_transpose(img)
        return np.asarray(ImageCms.profileToProfile(upright, source, ImageCms.createProfile("sRGB"), outputMode="RGB"))


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_a_cmyk_photo_is_converted_by_its_profile_and_its_output_says_srgb(fmt: str) -> None:
    data = cmyk_photo(fmt, PRESS, orientation=6)
    out = decode(data)
    shown = managed_view(data)
    with Image.open(io.BytesIO(data)) as img:
        plain = np.asarray(ImageOps.exif_transpose(img).convert("RGB")).astype(int)
    assert out.pixels.shape == shown.shape == (128, 128, 3)
    np.testing.assert_array_equal(out.pixels, shown)  # the same library, the same pixels
    assert np.abs(plain - shown).mean() > 10  # what Pillow's formula got wrong: the test profile's paper and inks
    written = encode(out.pixels, fmt, metadata=out.metadata)
    with Image.open(io.BytesIO(written)) as img:
        said = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"])).profile
        assert img.mode == "RGB" and (said.xcolor_space, said.profile_description) == ("RGB ", "sRGB built-in")
    assert decode(cmyk_photo(fmt, PRESS)).metadata.icc_profile == out.metadata.icc_profile  # the same bytes each time


def test_a_cmyk_photo_without_a_profile_is_converted_by_pillows_formula() -> None:
    data = cmyk_photo("JPEG", None)
    with Image.open(io.BytesIO(data)) as img:
        plain = np.asarray(img.convert("RGB"))
    out = decode(data)
    np.testing.assert_array_equal(out.pixels, plain)
    assert out.metadata.icc_profile is None


@pytest.mark.parametrize(
    ("pixels", "icc", "kept"),
    [
        (np.zeros((8, 8, 3), np.uint8), SRGB, True),
        (np.zeros((8, 8, 4), np.uint16), SRGB, True),
        (np.zeros((8, 8), np.uint8), grey_profile(), True),
        (np.zeros((8, 8, 2), np.uint16), grey_profile(), True),
        (np.zeros((8, 8), np.uint8), SRGB, False),  # an RGB profile on grey: libpng drops it with a warning
        (np.zeros((8, 8, 2), np.uint16), SRGB, False),
        (np.zeros((8, 8, 3), np.uint8), grey_profile(), False),
        (np.zeros((8, 8, 3), np.uint8), PRESS, False),  # CMYK on RGB: viewers reject it
        (np.zeros((8, 8, 3), np.uint8), b"not a profile" * 20, False),
    ],
)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP"])
def test_an_output_carries_a_profile_only_of_its_own_colours(
    pixels: np.ndarray, icc: bytes, kept: bool, fmt: str
) -> None:
    written = decode(encode(pixels, fmt, metadata=Metadata(icc_profile=icc)))
    assert written.metadata.icc_profile == (icc if kept else None)


def test_an_animation_that_becomes_colour_drops_a_grey_profile() -> None:
    """Frames are written in the widest layout among them: a grey first frame beside a colour one
    makes an RGB animation, which a grey profile does not describe."""
    frames = [np.zeros((8, 8), np.uint8), np.full((8, 8, 3), 200, np.uint8)]
    for icc, kept in ((grey_profile(), None), (SRGB, SRGB)):
        written = decode(encode_frames(frames, "PNG", metadata=Metadata(icc_profile=icc)))
        assert len(written.frames) == 2 and written.metadata.icc_profile == kept


def png_stating(chunks: list[tuple[bytes, bytes]], pixels: np.ndarray, **options: object) -> bytes:
    info = PngImagePlugin.PngInfo()
    for kind, data in chunks:
        info.add(kind, data)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", pnginfo=info, **options)
    return buffer.getvalue()


MAC_GAMMA = (b"gAMA", struct.pack(">I", 55556))  # 1/1.8, as Macs wrote PNGs before 2009
PRIMARIES = (b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000))


@pytest.mark.parametrize("pixels", [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint16)], ids=["rgb", "grey16"])
@pytest.mark.parametrize("written", [np.uint8, np.uint16], ids=["to-8-bit", "to-16-bit-colour"])
def test_a_pngs_gamma_and_primaries_go_with_it(pixels: np.ndarray, written: type) -> None:
    """A PNG without a profile that states its gamma (1/1.8 here; 1.0 for linear data) and primaries:
    browsers honour gAMA and cHRM, so an output without them shows lighter or darker. On the code
    before, neither was written. (16-bit colour is written by libpng, the chunks beside its pixels.)"""
    image = decode(png_stating([MAC_GAMMA, PRIMARIES], pixels))
    output = np.zeros((8, 8, 3), written)
    with Image.open(io.BytesIO(encode(output, "PNG", metadata=image.metadata))) as out:
        assert out.info["gamma"] == 0.55556
        assert out.info["chromaticity"] == (0.3127, 0.329, 0.64, 0.33, 0.3, 0.6, 0.15, 0.06)


def test_an_srgb_chunk_is_kept_and_never_written_beside_a_profile() -> None:
    image = decode(png_stating([(b"sRGB", b"\x01")], np.zeros((8, 8, 3), np.uint8)))  # relative colorimetric
    with Image.open(io.BytesIO(encode(image.pixels, "PNG", metadata=image.metadata))) as out:
        assert out.info["srgb"] == 1
    both = Metadata(icc_profile=SRGB, png_colour=(b"sRGB\x01",))
    with Image.open(io.BytesIO(encode(np.zeros((8, 8, 3), np.uint8), "PNG", metadata=both))) as out:
        assert "srgb" not in out.info and out.info["icc_profile"] == SRGB  # the PNG spec allows one of them
