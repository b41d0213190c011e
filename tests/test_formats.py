"""The formats phones, browsers and archives use beside the classic ones: HEIC (an iPhone's photos),
AVIF (the web's) and JPEG 2000 (library and archive scans, often 16 bits a sample, their ICC profile
and XMP in the file's boxes). On the code before, a folder of them was upscaled into nothing: their
suffixes were not listed, so no output and no manifest row said so; a JPEG 2000 of 16-bit colour,
which Pillow reads as black, would have come out black."""

from __future__ import annotations

import io
import struct

import imagecodecs
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageCms

from pipeline import jp2
from pipeline.cli import build_parser
from pipeline.images import DecodeError, Metadata, decode, encode, encode_frames, output_format, output_suffix
from tests.icc import grey_profile

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = (
    b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
    b"<rdf:Description xmlns:dc='http://purl.org/dc/elements/1.1/' dc:creator='Ann Archivist'/></rdf:RDF></x:xmpmeta>"
)
PHOTO = skimage.data.astronaut()[100:180, 150:270]  # 80 x 120, the face


def saved(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def camera_exif(orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x8298], exif[0x0112] = "Apple", "(c) Ann Archivist", orientation
    return exif.tobytes()


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def described(metadata: Metadata) -> tuple[bool, bool, str | None]:
    """(carries sRGB's profile, carries the XMP creator, EXIF's copyright)."""
    exif = Image.Exif()
    if metadata.exif:
        exif.load(metadata.exif)
    return metadata.icc_profile == SRGB, b"Ann Archivist" in (metadata.xmp or b""), exif.get(0x8298)


# ----------------------------------------------------------------------------- HEIC


def test_a_heic_photo_is_read_upright_with_its_metadata_and_written_as_jpeg() -> None:
    # Stored on its side with orientation 6, as a phone held upright stores it (libheif's irot box).
    data = saved(Image.fromarray(PHOTO), "HEIF", quality=95, exif=camera_exif(6), icc_profile=SRGB, xmp=XMP)
    image = decode(data)
    assert image.format == "HEIF" and len(image.frames) == 1
    pixels = image.pixels
    assert pixels.shape == (120, 80, 3)  # turned a quarter clockwise, once
    assert mean_error(pixels, np.rot90(PHOTO, -1)) < 2.0  # HEVC at quality 95
    assert mean_error(pixels, np.rot90(PHOTO, 1)) > 20
    assert described(image.metadata) == (True, True, "(c) Ann Archivist")
    # x265, the one HEVC encoder, holds at most 142.6 MP: an iPhone photo x4 (195 MP) would not fit.
    assert output_format("phone/IMG_0001.HEIC") == "JPEG"
    assert output_suffix("phone/IMG_0001.HEIC", "JPEG") == ".jpg"
    jpeg = encode(pixels, "JPEG", metadata=image.metadata.for_output(320, 480, 4))
    with Image.open(io.BytesIO(jpeg)) as out:
        assert out.format == "JPEG" and out.getexif().get(0x0112, 1) == 1
    assert described(decode(jpeg).metadata) == (True, True, "(c) Ann Archivist")


def test_a_heic_of_several_pictures_gives_its_primary_one() -> None:
    shots = [Image.fromarray(np.full((40, 60, 3), level, np.uint8)) for level in (30, 130, 230)]
    data = saved(shots[0], "HEIF", save_all=True, append_images=shots[1:], primary_index=1)
    image = decode(data)
    assert len(image.frames) == 1 and abs(float(image.pixels.mean()) - 130) < 2


# ----------------------------------------------------------------------------- AVIF


def test_an_avif_keeps_alpha_and_metadata_and_comes_back_avif() -> None:
    alpha = np.linspace(0, 255, PHOTO.shape[0] * PHOTO.shape[1]).reshape(PHOTO.shape[:2]).astype(np.uint8)
    rgba = np.dstack([PHOTO, alpha])
    data = saved(Image.fromarray(rgba), "AVIF", quality=95, exif=camera_exif(), icc_profile=SRGB, xmp=XMP)
    image = decode(data)
    assert image.format == "AVIF" and image.pixels.shape == (80, 120, 4)
    assert mean_error(image.pixels, rgba) < 2.0
    assert output_format("web/hero.avif") == "AVIF"
    out = encode(image.pixels, "AVIF", metadata=image.metadata)
    again = decode(out)
    assert again.format == "AVIF" and mean_error(again.pixels, rgba) < 3.0
    assert described(again.metadata) == (True, True, "(c) Ann Archivist")


def test_an_animated_avif_keeps_every_frame_and_its_timing() -> None:
    frames = [Image.fromarray(np.roll(PHOTO, 30 * i, axis=1)) for i in range(3)]
    data = saved(frames[0], "AVIF", save_all=True, append_images=frames[1:], duration=[100, 200, 300], quality=95)
    image = decode(data)
    assert len(image.frames) == 3 and image.metadata.durations == (100, 200, 300)
    assert image.metadata.loop == 0  # AVIF states no count Pillow reads: sequences loop
    for got, want in zip(image.frames, frames, strict=True):
        assert mean_error(got, np.asarray(want)) < 2.0
    again = decode(encode_frames(list(image.frames), "AVIF", metadata=image.metadata))
    assert len(again.frames) == 3 and again.metadata.durations == (100, 200, 300)


# ----------------------------------------------------------------------------- JPEG 2000


def with_boxes(data: bytes, *, exif_header: bool) -> bytes:
    """A JP2 from OpenJPEG with an ICC profile, XMP and EXIF put in by hand, as other writers put them
    (EXIF with or without "Exif\\0\\0" before its TIFF structure), and a resolution of 300 dpi."""
    boxes = list(jp2._boxes(data))
    header = next(b for b in boxes if b[0] == b"jp2h")
    inner = b"".join(
        (jp2._box(b"colr", b"\x02\x00\x00" + SRGB) if kind == b"colr" else data[start:end])
        for kind, start, _, end in jp2._boxes(data, header[2], header[3])
    )
    resc = struct.pack(">HHHHbb", 11811, 1, 11811, 1, 0, 0)  # pixels a metre, as most writers round them
    inner += jp2._box(b"res ", jp2._box(b"resc", resc))
    exif = camera_exif()[6:]  # Pillow's bytes begin "Exif\0\0"
    extra = jp2._box(b"uuid", jp2.XMP_UUID + XMP) + jp2._box(
        b"uuid", jp2.EXIF_UUID + (b"Exif\x00\x00" if exif_header else b"") + exif
    )
    head = data[: header[1]]
    return head + jp2._box(b"jp2h", inner) + extra + data[header[3] :]


@pytest.mark.parametrize("exif_header", [False, True], ids=["exiftool", "digikam"])
def test_a_jpeg2000_scan_is_lossless_and_keeps_its_boxes(exif_header: bool) -> None:
    data = with_boxes(imagecodecs.jpeg2k_encode(PHOTO, level=0, codecformat="jp2"), exif_header=exif_header)
    image = decode(data)
    assert image.format == "JPEG2000" and np.array_equal(image.pixels, PHOTO)
    assert described(image.metadata) == (True, True, "(c) Ann Archivist")
    assert image.metadata.dpi == pytest.approx((300, 300), abs=0.01)
    out = encode(image.pixels, "JPEG2000", metadata=image.metadata.for_output(480, 320, 4))
    assert np.array_equal(imagecodecs.jpeg2k_decode(out), PHOTO)  # OpenJPEG reads the boxes written
    again = decode(out)
    assert described(again.metadata) == (True, True, "(c) Ann Archivist")
    assert again.metadata.dpi == (1200.0, 1200.0)  # whole dpi are exact in the box isosr writes
    assert output_format("scans/page 1.jp2") == "JPEG2000" and output_suffix("scans/page 1.jp2", "JPEG2000") == ".jp2"


@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_colour_jpeg2000_keeps_sixteen_bits(channels: int) -> None:
    rng = np.random.default_rng(channels)
    deep = PHOTO.astype(np.uint16) * 256 + rng.integers(0, 256, PHOTO.shape, dtype=np.uint16)
    if channels == 4:
        deep = np.dstack([deep, np.linspace(0, 65535, 80 * 120).reshape(80, 120).astype(np.uint16)])
    image = decode(imagecodecs.jpeg2k_encode(deep, level=0, codecformat="jp2"))  # Pillow: every pixel black
    assert image.pixels.dtype == np.uint16 and np.array_equal(image.pixels, deep)
    out = encode(image.pixels, "JPEG2000", metadata=Metadata(icc_profile=SRGB))
    again = decode(out)
    assert np.array_equal(again.pixels, deep) and again.metadata.icc_profile == SRGB
    # OpenJPEG reads the file too; it converts through the profile (sRGB to sRGB: 2 of 65535 at most).
    assert np.abs(imagecodecs.jpeg2k_decode(out).astype(np.int32) - deep).max() <= 2


def test_a_profiled_jpeg2000_keeps_its_pixels_as_stored_and_its_profile() -> None:
    # OpenJPEG converts a profiled file into sRGB (grey into RGB) when it decodes it: the profile would
    # then describe pixels it no longer fits.
    grey = PHOTO[..., 0].astype(np.uint16) * 257 + np.arange(120, dtype=np.uint16)
    data = jp2.write(imagecodecs.jpeg2k_encode(grey, level=0, codecformat="jp2"), icc=grey_profile())
    assert imagecodecs.jpeg2k_decode(data).shape == (80, 120, 3)
    image = decode(data)
    assert np.array_equal(image.pixels, grey) and image.metadata.icc_profile == grey_profile()


def test_twelve_bit_jpeg2000_is_spread_over_sixteen_bits() -> None:
    grey = np.linspace(0, 4095, 80 * 120).reshape(80, 120).astype(np.uint16)
    image = decode(imagecodecs.jpeg2k_encode(grey, level=0, codecformat="j2k", bitspersample=12))
    assert image.pixels.dtype == np.uint16
    assert image.pixels.min() == 0 and image.pixels.max() == 65535  # white stays white, not 65520
    assert np.array_equal(image.pixels >> 4, grey)


@pytest.mark.parametrize("suffix", [".j2k", ".J2C", ".jpx", ".jpf"])
def test_other_jpeg2000_suffixes_are_read_and_written_as_jp2(suffix: str) -> None:
    """A bare codestream (.j2k, .j2c) or a JPX file is read; its output is a JP2 file, named .jp2, since
    a codestream holds no metadata boxes and a JP2 under .j2k would mislead a reader that trusts names."""
    codecformat = "j2k" if suffix.lower() in (".j2k", ".j2c") else "jp2"
    image = decode(imagecodecs.jpeg2k_encode(PHOTO, level=0, codecformat=codecformat))
    assert np.array_equal(image.pixels, PHOTO)
    key = "scans/page" + suffix
    assert output_format(key) == "JPEG2000" and output_suffix(key, "JPEG2000") == ".jp2"


def test_signed_jpeg2000_samples_are_refused_by_name() -> None:
    signed = (PHOTO[..., 0].astype(np.int16) - 128).astype(np.int16)
    with pytest.raises(DecodeError, match="16-bit signed samples are not supported"):
        decode(imagecodecs.jpeg2k_encode(signed, level=0, codecformat="jp2"))


# ----------------------------------------------------------------------------- every new format


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "JPEG2000"])
@pytest.mark.parametrize("kept", [0.9, 0.5, 0.05])
def test_a_truncated_file_is_a_decode_error(fmt: str, kept: float) -> None:
    data = saved(Image.fromarray(PHOTO), fmt)
    with pytest.raises(DecodeError):
        decode(data[: int(len(data) * kept)], name="cut." + fmt.lower())


@pytest.mark.parametrize(("value", "fmt"), [("jp2", "JPEG2000"), ("AVIF", "AVIF"), ("jpg", "JPEG"), ("tif", "TIFF")])
def test_format_names_users_type_are_understood(value: str, fmt: str) -> None:
    args = build_parser().parse_args(["upscale", "src", "dst", "--format", value])
    assert args.output_format == fmt


# ----------------------------------------------------------------------------- Netpbm and TGA


def netpbm_colour(pixels: np.ndarray, maxval: int) -> bytes:
    """A binary (P6) Netpbm colour file of samples up to `maxval`, two bytes each above 255."""
    h, w, _ = pixels.shape
    return f"P6\n# written by hand\n{w} {h}\n{maxval}\n".encode() + pixels.astype(">u2").tobytes()


@pytest.mark.parametrize(
    ("name", "mode", "options"),
    [("scan.ppm", "RGB", {}), ("scan.pnm", "RGB", {}), ("page.pgm", "L", {}), ("page.pbm", "1", {}),
     ("texture.tga", "RGBA", {"compression": "tga_rle"}), ("texture.TGA", "L", {"orientation": 1})],
)  # fmt: skip
def test_netpbm_and_tga_files_are_read_as_stored_and_written_as_png(name: str, mode: str, options: dict) -> None:
    rgb = skimage.data.astronaut()[100:170, 150:240]
    img = Image.fromarray(np.dstack([rgb, rgb[..., 0]])).convert(mode)
    data = saved(img, "TGA" if name.lower().endswith(".tga") else "PPM", **options)
    [frame] = decode(data, name=name).frames
    assert np.array_equal(frame, np.asarray(img.convert("L") if mode == "1" else img))  # black and white as 0 and 255
    assert (output_format(name), output_suffix(name, output_format(name))) == ("PNG", ".png")
    with Image.open(io.BytesIO(encode(frame, "PNG"))) as back:
        assert np.array_equal(np.asarray(back), frame)


def test_sixteen_bit_netpbm_colour_keeps_its_bits_and_other_depths_are_spread() -> None:
    rgb16 = skimage.data.astronaut()[100:170, 150:240].astype(np.uint16) * 257 + np.arange(90, dtype=np.uint16)[:, None]
    [frame] = decode(netpbm_colour(rgb16, 65535)).frames
    assert frame.dtype == np.uint16 and np.array_equal(frame, rgb16)  # Pillow alone would keep 8 bits
    assert np.array_equal(imagecodecs.png_decode(encode(frame, "PNG")), rgb16)
    ten_bit = np.array([[[0, 500, 1000]]], np.uint16)
    assert decode(netpbm_colour(ten_bit, 1000)).frames[0].tolist() == [[[0, 32768, 65535]]]
    with pytest.raises(DecodeError, match=r"^cut\.ppm: truncated"):
        decode(netpbm_colour(rgb16, 65535)[:-100], name="cut.ppm")
