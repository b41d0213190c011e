"""TIFFs as scanners, microscopes, image servers and editors write them, beyond the layouts Pillow
reads at full depth: 16-bit colour in several strips, in tiles or one plane a channel; 16-bit grey
with alpha, which Pillow cannot open; white-is-zero 16-bit grey; 12-bit samples; premultiplied
16-bit alpha; thumbnails and pyramid levels stored as extra pages. On the code before, each came
out 8 bits deep, as a negative, 16 times too dark, refused as "not an image", or with its previews
upscaled as pages; signed and floating-point samples were read as unsigned bytes or refused as
"not an image in any supported format"."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image, ImageCms

from pipeline.images import DecodeError, decode


def deep(channels: int, h: int = 37, w: int = 53) -> np.ndarray:
    """A photo crop at 16 bits whose low bytes are not copies of its high ones; HxW for one channel."""
    photo = skimage.data.astronaut()[100 : 100 + h, 150 : 150 + w].astype(np.uint16) * 256
    planes = np.dstack([photo, np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)])
    planes += np.random.default_rng(channels).integers(0, 256, (h, w, 4), dtype=np.uint16)
    return np.ascontiguousarray(planes[..., {1: 1, 2: [1, 3], 3: [0, 1, 2], 4: [0, 1, 2, 3]}[channels]])


def written(pixels: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, **options)
    return buffer.getvalue()


RGB, RGBA, LA = deep(3), deep(4), deep(2)


@pytest.mark.parametrize(
    ("layout", "data", "want"),
    [
        ("strips of 8 rows", written(RGB, photometric="rgb", rowsperstrip=8), RGB),
        ("tiles", written(RGB, photometric="rgb", tile=(16, 16)), RGB),
        ("a plane a channel", written(np.moveaxis(RGB, -1, 0), photometric="rgb", planarconfig="separate"), RGB),
        ("planes, deflated", written(np.moveaxis(RGBA, -1, 0), photometric="rgb", planarconfig="separate",
                                     extrasamples=["unassalpha"], compression="zlib"), RGBA),
        ("BigTIFF, big-endian", written(RGB, photometric="rgb", bigtiff=True, byteorder=">"), RGB),
        ("grey and alpha", written(LA, photometric="minisblack", extrasamples=["unassalpha"]), LA),
        ("grey and alpha in strips", written(LA, photometric="minisblack", extrasamples=["unassalpha"],
                                             rowsperstrip=4), LA),
        ("white is zero", written(65535 - deep(1), photometric="miniswhite"), deep(1)),
    ],
)  # fmt: skip
def test_sixteen_bit_tiffs_keep_every_bit_whatever_their_layout(layout: str, data: bytes, want: np.ndarray) -> None:
    out = decode(data, name="scan.tif")
    assert out.pixels.dtype == np.uint16 and out.pixels.shape == want.shape, layout
    np.testing.assert_array_equal(out.pixels, want, err_msg=layout)


def test_twelve_bit_samples_are_spread_over_sixteen() -> None:
    """Microscope and medical cameras store 12 bits: 4095 is white, not 1/16 of it."""
    twelve = np.array([[0, 1, 2048, 4095]], np.uint16)
    out = decode(written(twelve, photometric="minisblack", bitspersample=12)).pixels
    np.testing.assert_array_equal(out, [[0, 16, 32776, 65535]])  # v << 4 | v >> 8: black and white stay


def test_premultiplied_sixteen_bit_alpha_is_made_straight() -> None:
    straight = np.array([[[65535, 32768, 0, 32768], [1000, 2000, 3000, 0], [400, 500, 600, 65535]]], np.uint16)
    colour, alpha = straight[..., :3].astype(np.uint64), straight[..., 3:].astype(np.uint64)
    premultiplied = np.dstack([(colour * alpha + 32767) // 65535, alpha]).astype(np.uint16)
    out = decode(written(premultiplied, photometric="rgb", extrasamples=["assocalpha"])).pixels
    assert out.dtype == np.uint16
    visible = straight[..., 3] > 0  # where alpha is 0 the colour is gone: black
    np.testing.assert_allclose(out[visible], straight[visible], atol=2)  # rounding, twice
    np.testing.assert_array_equal(out[~visible], [[0, 0, 0, 0]])


def test_a_tiff_pillow_cannot_open_keeps_its_metadata_and_orientation() -> None:
    """16-bit grey and alpha: Pillow has no mode for it, so tifffile reads the pixels and the tags."""
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    data = written(
        LA,
        photometric="minisblack",
        extrasamples=["unassalpha"],
        resolution=(600, 300),
        resolutionunit="INCH",
        iccprofile=icc,
        extratags=[(0x0112, 3, 1, 6, True), (0x010F, 2, None, "Hasselblad", True), (700, 1, None, xmp, True)],
    )
    with pytest.raises(Exception):  # noqa: B017 - that Pillow cannot is the point: its error type is its own
        Image.open(io.BytesIO(data))
    out = decode(data)
    np.testing.assert_array_equal(out.pixels, np.rot90(LA, -1))  # orientation 6: a quarter clockwise
    assert out.metadata.icc_profile == icc and out.metadata.xmp == xmp
    assert out.metadata.dpi == pytest.approx((300, 600))  # turned with the image
    exif = Image.Exif()
    exif.load(out.metadata.exif)
    assert exif[0x010F] == "Hasselblad" and 0x0112 not in exif and 0x0102 not in exif  # no layout tags


def test_thumbnails_and_pyramid_levels_are_not_upscaled_as_pages() -> None:
    """Extra pages marked as reduced-resolution copies (NewSubfileType bit 0), which cameras,
    scanners and tiled image servers store beside the picture: the pages are the full ones."""
    photo = skimage.data.astronaut()
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(photo, photometric="rgb", tile=(64, 64), compression="zlib")  # the picture
        tif.write(photo[::2, ::2], photometric="rgb", tile=(64, 64), subfiletype=1)  # its pyramid
        tif.write(photo[::4, ::4], photometric="rgb", tile=(64, 64), subfiletype=1)
        tif.write(photo[::-1], photometric="rgb", subfiletype=2)  # page 2 of a document
        tif.write(photo[::8, ::8], photometric="rgb", subfiletype=1)  # its thumbnail
    out = decode(buffer.getvalue())
    assert [f.shape for f in out.frames] == [(512, 512, 3), (512, 512, 3)]
    np.testing.assert_array_equal(out.frames[0], photo)
    np.testing.assert_array_equal(out.frames[1], photo[::-1])


def test_a_page_pillow_has_no_mode_for_is_read_beside_its_other_pages() -> None:
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(skimage.data.astronaut()[:40, :60], photometric="rgb")
        tif.write(LA, photometric="minisblack", extrasamples=["unassalpha"])
    out = decode(buffer.getvalue())
    assert [f.dtype for f in out.frames] == [np.uint8, np.uint16]
    np.testing.assert_array_equal(out.frames[1], LA)


@pytest.mark.parametrize(
    ("pixels", "what"),
    [
        (np.zeros((8, 8), np.float32), "32-bit floating-point"),
        (np.zeros((8, 8, 3), np.float16), "16-bit floating-point"),
        (np.zeros((8, 8), np.int16), "16-bit signed integer"),
        (np.full((8, 8), -7, np.int8), "8-bit signed integer"),  # before: read as 249, a wrong picture
    ],
)
def test_signed_and_floating_point_samples_are_refused_by_name(pixels: np.ndarray, what: str) -> None:
    data = written(pixels, photometric="rgb" if pixels.ndim == 3 else "minisblack")
    with pytest.raises(DecodeError, match=rf"^hdr\.tif: {what} pixels are not supported .* convert the file"):
        decode(data, name="hdr.tif")
