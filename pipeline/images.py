"""Image files <-> arrays the tiler takes, with Pillow.

Decoding applies the EXIF orientation and maps every Pillow mode to one of the tiler's layouts:
  L -> HxW uint8; LA -> HxWx2; RGB -> HxWx3; RGBA -> HxWx4; I;16* / I (16-bit grey) -> HxW uint16;
  1 -> L; P -> RGBA if it has transparency, else RGB; PA -> RGBA; CMYK, YCbCr, LAB, HSV -> RGB.
16-bit colour and 16-bit grey with alpha (PNG, TIFF, JPEG 2000) -> HxWx2, x3 or x4 uint16: Pillow
has no mode for them (it reads them as 8 bits and writes none), so libpng, OpenJPEG (imagecodecs)
and tifffile read and write their pixels, and Pillow the rest of the file (_png, _sixteen_bit). tifffile reads every
9- to 16-bit grey or RGB TIFF page (_tiff_pixels), whatever its layout; Pillow the other pages, and the metadata.
Every PNG isosr writes of one picture, at 8 bits too, has its pixels encoded by libpng (_png: faster than Pillow's
encoder, for smaller files).
What describes the photo travels with it (Metadata): the ICC profile, so the output keeps the
input's colours (a CMYK photo is converted by its profile into sRGB: _cmyk_to_srgb); EXIF and XMP
(camera, dates, GPS, author, copyright); the resolution; PNG text.
Every page of a multi-page TIFF and every frame of an animated GIF, PNG, WebP or AVIF is decoded
(each upright, in its own layout), and encode_frames writes them back as one file, with the frames'
timing. HEIC is read through pillow-heif (libheif); a JPEG 2000 of 9 to 16 bits by OpenJPEG
(imagecodecs), its metadata boxes by pipeline.jp2.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import imagecodecs
import numpy as np
import pillow_heif
import tifffile
from PIL import Image, ImageCms, ImageOps, IptcImagePlugin, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

from pipeline import jp2

# Suffix -> Pillow format. Output defaults to the input's format, but for two that isosr reads and
# does not write: GIF becomes PNG (a palette of 256 colours would undo the upscale), HEIF (a phone's
# HEIC photo) JPEG, because x265, the only HEVC encoder, holds at most 142.6 MP (an iPhone's 12 MP
# photo x4 is 195 MP) and encodes ~1 MP/s a core, slower than the model on a GPU (RESULTS.md).
FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".avif": "AVIF",
    ".jp2": "JPEG2000",
    ".j2k": "JPEG2000",  # a bare codestream
    ".j2c": "JPEG2000",
    ".jpx": "JPEG2000",  # JPEG 2000 part 2's container; Pillow reads the JP2 subset most such files are
    ".jpf": "JPEG2000",
    ".heic": "HEIF",
    ".heif": "HEIF",
    ".ppm": "PPM",  # Netpbm: colour, grey and black-and-white, all Pillow's "PPM"
    ".pgm": "PPM",
    ".pbm": "PPM",
    ".pnm": "PPM",
    ".tga": "TGA",
}
# Suffixes read whose outputs are named otherwise: isosr writes JPEG 2000 as a JP2 file (which holds
# the metadata boxes), so a .j2k, .j2c, .jpx or .jpf input's output is .jp2.
_RENAMED_SUFFIXES = {".j2k", ".j2c", ".jpx", ".jpf"}
OUTPUT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "AVIF": ".avif",
                 "JPEG2000": ".jp2", "GIF": ".png"}  # fmt: skip
_WRITTEN_AS = {
    "GIF": "PNG",
    "HEIF": "JPEG",
    "MPO": "JPEG",
    "PPM": "PNG",
    "TGA": "PNG",
}  # read, not written -> the output's
# Netpbm and TGA files are uncompressed, 16 times their input's size once upscaled, and a .pbm holds
# black and white alone: PNG keeps their pixels (16-bit ones too) and alpha, losslessly and compressed.
# HEIF (HEIC) in Pillow: libheif, with libde265 decoding HEVC; without the thumbnails, depth maps and
# other auxiliary pictures a phone stores beside the photo, which isosr does not upscale.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
# decode() enforces --max-pixels itself, from the header, before any pixel is decoded; Pillow's own
# lower limit (~179 MP, an error at twice its warning level) would otherwise override it.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 200_000_000  # larger inputs are refused unless --max-pixels says otherwise
# The most bytes a pixel of a supported image takes in a file: 16-bit RGBA or CMYK, uncompressed
# (TIFF, BMP); and room for what else a file holds (ICC profiles, EXIF, thumbnails, other pages).
MAX_BYTES_PER_PIXEL, MAX_METADATA_BYTES = 8, 64 * 2**20
_RGB_MODES = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"}
# Formats whose files hold several pictures that are all upscaled: a TIFF's pages, an animation's
# frames. (MPO, JPEG's multi-picture variant, is read as its first picture: its others are previews
# or a stereo partner that a JPEG output cannot hold. A HEIF is read as its primary picture: the
# photo a phone shows; its others are a burst's or edits'.)
_MULTI_FRAME = ("TIFF", "GIF", "PNG", "WEBP", "AVIF")
# Each frame costs at least a tile of network work however small it is: a file of 100,000 1x1
# frames would pass any pixel limit and cost hours. Long animations and books stay well below.
MAX_FRAMES = 10_000
_ANIMATED_OUTPUTS = ("PNG", "WEBP", "AVIF")
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order
_TIFF_SIXTEEN_BIT = (tifffile.PHOTOMETRIC.MINISWHITE, tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)


def output_suffix(key: str, fmt: str) -> str:
    """The suffix an output in `fmt` gets: the input's own when it already names that format
    (photo.jpeg stays .jpeg, scan.tiff stays .tiff), else the format's usual one."""
    suffix = ("." + key.rsplit(".", 1)[-1]) if "." in key.rsplit("/", 1)[-1] else ""
    return suffix if names_output(suffix, fmt) else OUTPUT_SUFFIX[fmt]


def names_output(suffix: str, fmt: str) -> bool:
    """Whether an output in `fmt` keeps `suffix` (".jpeg" for JPEG: yes; ".j2k" for JPEG 2000: no)."""
    return FORMATS.get(suffix.lower()) == fmt and suffix.lower() not in _RENAMED_SUFFIXES


def output_format(key: str, requested: str | None = None) -> str:
    """The Pillow format an input's output is written in: `requested`, else the format its suffix
    names (GIF becomes PNG), else PNG."""
    if requested:
        return requested
    fmt = FORMATS.get(("." + key.rsplit(".", 1)[-1].lower()) if "." in key else "", "PNG")
    return _WRITTEN_AS.get(fmt, fmt)


def output_format_of(decoded_format: str, requested: str | None = None) -> str:
    """The format an image known only by its bytes is written in (a shard's row has no suffix):
    `requested`, else the format Pillow decoded when isosr writes it (MPO, JPEG's multi-picture
    variant, as JPEG; GIF as PNG and HEIF as JPEG, as for files), else PNG."""
    if requested:
        return requested
    fmt = _WRITTEN_AS.get(decoded_format, decoded_format)
    return fmt if fmt in OUTPUT_SUFFIX else "PNG"


class DecodeError(ValueError):
    """An input that is not a usable image; the message says why."""


# EXIF tags carried over: those of the first IFD that describe the photo, not the stored file (its
# layout, strips, orientation, thumbnail), and the Exif and GPS IFDs but for what cannot move with
# it: the maker note (vendor data with offsets into the old file) and the interoperability pointer.
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_EXIF_KEPT = {
    0x010D, 0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x013B, 0x013C, 0x8298,  # names, camera, software, dates, artist, copyright
    0x011A, 0x011B, 0x0128,  # resolution (scaled with the image)
    0x4746, 0x4749, 0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F,  # rating; Windows' title, comment, author, keywords, subject
}  # fmt: skip
# An ImageDescription that records the stored array's layout, not the photo (tifffile's, ImageJ's):
# carried over, it would describe the input's shape, and tifffile would warn on reading the output.
_LAYOUT_DESCRIPTIONS = ('{"shape":', "ImageJ=")
_EXIF_DROPPED = {0x927C, 0xA005}  # maker note, interoperability IFD
_PIXEL_DIMENSIONS = (0xA002, 0xA003)  # in the Exif IFD: the image's width and height
_RESOLUTION = (0x011A, 0x011B)
_XMP_ORIENTATION = (rb"""tiff:Orientation\s*=\s*["'][0-9]["']""", rb"<tiff:Orientation>\s*[0-9]\s*</tiff:Orientation>")
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image a quarter
# JPEG holds EXIF and XMP in one marker segment each (Pillow writes no extended XMP).
_JPEG_MAX_EXIF, _JPEG_MAX_XMP = 65533, 65504
_TIFF_IPTC = 33723  # the TIFF tag of IPTC records


@dataclass(frozen=True)
class Metadata:
    """What an output carries over from its input: the ICC profile (where it describes the output's
    colours: _profile_fitted); EXIF, filtered (_EXIF_KEPT) and upright (no orientation: the pixels
    are turned); XMP, without its orientation (Pillow, for one, turns an image by XMP's where EXIF
    has none); IPTC records (captions, keywords, credits: to JPEG and TIFF outputs); the resolution
    in dots per inch; PNG text chunks and a PNG's colour chunks, gAMA, cHRM and sRGB (type and
    data each; to PNG outputs: browsers honour a gamma of 1.8 or 1.0); an animation's timing: each
    frame's duration in milliseconds and how often it plays (0: forever, None: the input said
    nothing, so once). Maker notes, thumbnails, comments and Photoshop's other resources are not
    carried."""

    icc_profile: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    dpi: tuple[float, float] | None = None
    text: tuple[tuple[str, str], ...] = ()
    iptc: bytes | None = None
    durations: tuple[int, ...] = ()
    loop: int | None = None
    png_colour: tuple[bytes, ...] = ()

    def for_output(self, width: int, height: int, scale: int) -> Metadata:
        """The same, for an output of width x height pixels, `scale` times the input's: the same
        physical size, so a resolution `scale` times finer; EXIF's pixel dimensions the new ones."""
        dpi = (self.dpi[0] * scale, self.dpi[1] * scale) if self.dpi else None
        if self.exif is None:
            return replace(self, dpi=dpi)
        try:
            exif = Image.Exif()
            exif.load(self.exif)
            for tag in _RESOLUTION:
                if tag in exif:
                    value = float(exif[tag]) * scale
                    if 0 < value < 1e6:
                        exif[tag] = value
                    else:
                        del exif[tag]
            if _EXIF_IFD in exif:  # JPEG's EXIF requires them there
                exif.get_ifd(_EXIF_IFD).update(zip(_PIXEL_DIMENSIONS, (width, height)))
            return replace(self, exif=exif.tobytes(), dpi=dpi)
        except Exception:  # noqa: BLE001 - EXIF that cannot be rewritten is left out, the image is not
            return replace(self, exif=None, dpi=dpi)

    def as_row(self) -> dict[str, Any]:
        return {"icc_profile": self.icc_profile, "exif": self.exif, "xmp": self.xmp,
                "dpi": list(self.dpi) if self.dpi else None, "text": [list(kv) for kv in self.text], "iptc": self.iptc,
                "durations": list(self.durations), "loop": self.loop, "png_colour": list(self.png_colour)}  # fmt: skip

    @classmethod
    def from_row(cls, row: dict[str, Any] | None) -> Metadata:
        if not row:
            return cls()
        dpi, text = row["dpi"], row["text"] or ()
        return cls(**{**row, "dpi": tuple(dpi) if dpi else None, "text": tuple((k, v) for k, v in text),
                      "durations": tuple(row.get("durations") or ()),
                      "png_colour": tuple(row.get("png_colour") or ())})  # fmt: skip


@dataclass(frozen=True)
class Decoded:
    frames: tuple[np.ndarray, ...]  # each HxW, HxWx2, x3 or x4; uint8 or uint16; one for most images
    format: str  # Pillow format of the source, e.g. "PNG"
    metadata: Metadata  # the first frame's (TIFF pages' own are not kept), with the animation's timing

    @property
    def pixels(self) -> np.ndarray:
        """The first (for most images the only) frame."""
        return self.frames[0]


def file_too_large(size: int, max_pixels: int | None) -> str | None:
    """Why a file of `size` bytes cannot hold an image of at most `max_pixels` pixels, or None. Such a
    file is refused before it is read: it is read whole into memory, and one of many gigabytes would
    take a worker's memory (a 6 GB file: 6.3 GB, RESULTS.md) to fail as an image anyway."""
    if max_pixels is None or size <= (most := max_pixels * MAX_BYTES_PER_PIXEL + MAX_METADATA_BYTES):
        return None
    return (
        f"{size:,} bytes is more than an image of --max-pixels {max_pixels:,} pixels takes ({most:,} bytes "
        f"at most: {MAX_BYTES_PER_PIXEL} a pixel, uncompressed, and {MAX_METADATA_BYTES // 2**20} MiB more); "
        "nothing was read; raise --max-pixels if this file is an image"
    )


def decode(data: bytes, *, name: str | None = None, max_pixels: int | None = None) -> Decoded:
    """Decode image bytes: every page of a TIFF, every frame of an animation. Raises DecodeError (its
    message starting with `name`, when given) for empty, truncated or unknown data, unsupported
    modes, and images whose pixels (all frames together) are above `max_pixels`."""
    try:
        return _decode(data, max_pixels)
    except DecodeError as e:
        raise DecodeError(f"{name}: {e}" if name else str(e)) from None


def _decode(data: bytes, max_pixels: int | None) -> Decoded:
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        if tif := _tiff_file(data):
            with tif:
                return _decode_tiff(data, tif, max_pixels)
        return _decode_pillow(data, max_pixels)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(
            "not an image in any supported format (PNG, JPEG, WebP, TIFF, BMP, GIF, AVIF, HEIC, JPEG 2000, Netpbm, TGA)"
        ) from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types on hostile files
        raise DecodeError(f"not a readable image ({type(e).__name__}: {e})") from None


def _tiff_file(data: bytes) -> tifffile.TiffFile | None:
    """tifffile's reading of a TIFF, or None where `data` is no TIFF or one tifffile cannot parse
    (Pillow then reads it, or says why it cannot)."""
    if data[:4] not in _TIFF_MAGIC:
        return None
    try:
        return tifffile.TiffFile(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - tifffile raises many types on hostile files
        return None


def _decode_pillow(data: bytes, max_pixels: int | None) -> Decoded:
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format or "PNG"
        count = _checked_count(getattr(img, "n_frames", 1) if fmt in _MULTI_FRAME else 1)
        sizes = [img.size] * count if fmt != "TIFF" else [(img.seek(i), img.size)[1] for i in range(count)]
        _check_pixels(fmt, sizes, max_pixels)
        if count > 1:  # a HEIF of several pictures opens at its primary one, which need not be the first
            img.seek(0)
        channels = _sixteen_bit_channels(img)  # before _metadata: a PNG's text is read by decoding it
        metadata = _metadata(img) if fmt != "JPEG2000" else _jp2_metadata(data, img)
        frames = [_frame(data, img, channels)]
        durations = [_duration(img)]
        for index in range(1, count):
            with _frame_named(index, count):
                img.seek(index)
                frames.append(_frame(data, img, _sixteen_bit_channels(img)))
            durations.append(_duration(img))
        if count > 1 and fmt != "TIFF":  # at the last frame, reading a PNG's text decodes nothing more
            # Pillow reports no loop count for AVIF, whose sequences loop forever unless they say otherwise.
            loop = img.info.get("loop", 0 if fmt == "AVIF" else None)
            timing = {"durations": tuple(durations), "loop": _loop(loop)}
            metadata = replace(metadata, text=_png_text(img), **timing)
    return Decoded(tuple(frames), fmt, metadata)


def _decode_tiff(data: bytes, tif: tifffile.TiffFile, max_pixels: int | None) -> Decoded:
    """A TIFF's pages, but for reduced-resolution copies and transparency masks of another page
    (thumbnails, pyramid levels): 16-bit ones by tifffile (_tiff_pixels), others by Pillow, which
    also reads the metadata; where Pillow has no mode for the file at all (16-bit grey and alpha,
    floating point), tifffile alone."""
    _checked_count(len(tif.pages))
    pages = [(i, p) for i, p in enumerate(tif.pages) if not (p.is_reduced or p.is_mask)]
    pages = pages or [(0, tif.pages.first)]
    _check_pixels("TIFF", [(p.imagewidth, p.imagelength) for _, p in pages], max_pixels)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # no Pillow mode for the layout: tifffile reads it, or says why not
        img = None
    with img or contextlib.nullcontext():
        metadata = _metadata(img) if img else _tiff_metadata(data)
        frames = []
        for number, (index, page) in enumerate(pages):
            with _frame_named(number, len(pages)):
                frames.append(_tiff_page(img, index, page))
    return Decoded(tuple(frames), "TIFF", metadata)


def _tiff_page(img: Image.Image | None, index: int, page: tifffile.TiffPage) -> np.ndarray:
    """The pixels of TIFF page `page` (number `index`), upright: tifffile's where they are 16-bit
    grey or colour, which Pillow would read at 8 bits or not at all; else Pillow's."""
    dtype = page.dtype
    if dtype is not None and dtype.kind in "fic":
        what = {"f": "floating-point", "i": "signed integer", "c": "complex"}[dtype.kind]
        raise DecodeError(
            f"{page.bitspersample}-bit {what} pixels are not supported (isosr reads 8- and 16-bit unsigned ones): "
            "convert the file to 8- or 16-bit unsigned integers first"
        )
    if img is not None:
        try:
            img.seek(index)
        except Exception:  # noqa: BLE001 - a page Pillow has no mode for: tifffile's alone
            img = None
    if dtype == np.uint16 and page.photometric in _TIFF_SIXTEEN_BIT:
        orientation = _orientation(img) if img else page.tags.valueof(0x0112, 1)
        return _upright(_tiff_pixels(page), orientation)
    if img is None:
        raise _unread_layout(page)
    return _pillow_pixels(img)


def _unread_layout(page: tifffile.TiffPage) -> DecodeError:
    """The error for a TIFF page neither tifffile's path nor Pillow reads, naming its layout."""
    photometric = getattr(page.photometric, "name", page.photometric)
    layout = f"{page.samplesperpixel} samples of {page.bitspersample} bits a pixel, photometric {photometric}"
    return DecodeError(f"a TIFF page of a layout isosr does not read ({layout})")


def _tiff_pixels(page: tifffile.TiffPage) -> np.ndarray:
    """A TIFF page's stored (not yet upright) 9- to 16-bit grey or RGB pixels, as HxW or HxWxC
    uint16: alpha kept (unpremultiplied if it was premultiplied), other extra samples dropped, as
    Pillow drops RGBX's fourth; white-is-zero grey inverted; 12-bit values spread over 16 bits."""
    pixels = page.asarray()
    if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and page.samplesperpixel > 1:
        pixels = np.moveaxis(pixels, 0, -1)
    colour = 3 if page.photometric == tifffile.PHOTOMETRIC.RGB else 1
    extra = tuple(page.extrasamples)
    alpha = bool(extra) and extra[0] in (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
    channels = colour + alpha
    if page.samplesperpixel != colour + len(extra):  # channels of no stated meaning: not a photo's
        raise _unread_layout(page)
    h, w = page.imagelength, page.imagewidth
    pixels = pixels.reshape(h, w, -1) if pixels.size == h * w * page.samplesperpixel else pixels
    if pixels.shape[:2] != (h, w) or pixels.ndim != 3 or pixels.shape[2] < channels:
        raise DecodeError(f"16-bit pixels decoded as {pixels.shape}, where the header says {(h, w, channels)}")
    pixels = pixels[..., :channels]
    pixels = _spread(pixels, page.bitspersample)
    if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        pixels[..., 0] = 65535 - pixels[..., 0]
    if alpha and extra[0] == tifffile.EXTRASAMPLE.ASSOCALPHA:
        a = pixels[..., colour].astype(np.uint32)
        for c in range(colour):
            straight = (pixels[..., c] * np.uint32(65535) + a // 2) // np.maximum(a, 1)
            pixels[..., c] = np.minimum(straight, 65535)
    return pixels if channels > 1 else pixels[..., 0]


@contextlib.contextmanager
def _frame_named(number: int, count: int) -> Iterator[None]:
    """Errors decoding frame `number` (from 0) of `count` name it, in a file of several."""
    try:
        yield
    except Exception as e:
        if count == 1:
            raise
        if isinstance(e, DecodeError):
            raise DecodeError(f"frame {number + 1} of {count}: {e}") from None
        raise DecodeError(f"frame {number + 1} of {count} is not readable ({type(e).__name__}: {e})") from None


def _checked_count(count: int) -> int:
    """`count` frames, refused above MAX_FRAMES before any of them is read."""
    if count > MAX_FRAMES:
        raise DecodeError(
            f"{count} pages or frames are more than isosr upscales from one file ({MAX_FRAMES}); split it"
        )
    return count


def _check_pixels(fmt: str, sizes: list[tuple[int, int]], max_pixels: int | None) -> None:
    """Refuse frames of (width, height) `sizes` that together have more than `max_pixels` pixels:
    from the headers alone, before any pixel is read."""
    count = len(sizes)
    pixels = sum(w * h for w, h in sizes)
    if max_pixels is not None and pixels > max_pixels:
        (w, h) = sizes[0]
        what = (
            f"{w}x{h} = {pixels} pixels is"
            if count == 1
            else f"{count} pages of {pixels} pixels together are"
            if fmt == "TIFF"
            else f"{count} frames of {w}x{h} = {pixels} pixels are"
        )
        raise DecodeError(f"{what} above the limit of {max_pixels}; raise --max-pixels if this image is expected")


def _frame(data: bytes, img: Image.Image, channels: int) -> np.ndarray:
    """The pixels of `img`'s current frame, upright: Pillow's, or where it would reduce them to 8
    bits (`channels`: _sixteen_bit_channels), libpng's; a JPEG 2000's of 9 to 16 bits, OpenJPEG's."""
    if img.format == "JPEG2000" and (depth := _jpeg2000_depth(data)) > 8:
        return _upright(_jpeg2000_pixels(data, img, depth), _orientation(img))
    if img.format == "PPM" and (pixels := _netpbm_colour(data, img)) is not None:
        return pixels
    if not channels:
        return _pillow_pixels(img)
    if img.format != "PNG":  # a TIFF tifffile could not parse (_decode)
        raise DecodeError("16-bit colour in a TIFF that tifffile cannot read; Pillow would keep only 8 bits")
    if getattr(img, "is_animated", False):
        raise DecodeError("an animated PNG with 16-bit colour is not supported (its frames would lose 8 bits)")
    orientation = _orientation(img)
    return _upright(_sixteen_bit_pixels(data, img, channels), orientation)


def _netpbm_colour(data: bytes, img: Image.Image) -> np.ndarray | None:
    """A binary Netpbm colour file's pixels where its samples have more than 8 bits (maxval 256 to
    65535), as HxWx3 uint16 spread over 16 bits; None for any other Netpbm file. Pillow reads such
    colour at 8 bits (16-bit grey it keeps), and no library here reads it otherwise; the layout is
    Netpbm's: after the header Pillow has parsed, two big-endian bytes a sample, row by row."""
    tile = img.tile[0] if len(img.tile) == 1 else None
    if tile is None or tile.codec_name != "ppm" or img.mode != "RGB" or not isinstance(tile.args, tuple):
        return None
    maxval = int(tile.args[1])
    if maxval < 256:
        return None
    count = img.height * img.width * 3
    if len(data) < tile.offset + 2 * count:
        raise DecodeError(f"truncated: {img.width}x{img.height} 16-bit colour needs {2 * count:,} bytes of pixels")
    samples = np.frombuffer(data, ">u2", count=count, offset=tile.offset).reshape(img.height, img.width, 3)
    spread = (np.minimum(samples, maxval).astype(np.uint32) * 65535 + maxval // 2) // maxval  # as Pillow spreads grey
    return spread.astype(np.uint16)


def _jpeg2000_depth(data: bytes) -> int:
    """The bits a sample of a JPEG 2000's first component (from its codestream's SIZ marker, ISO
    15444-1 A.5.1: Ssiz is bits - 1, its top bit set for signed samples); raises DecodeError for signed
    samples, 0 where the marker is not found (Pillow then reads the file, or says why it cannot)."""
    at = data.find(b"\xff\x4f\xff\x51")  # SOC then SIZ open every codestream, bare or in a JP2's jp2c box
    if at < 0 or len(data) < at + 4 + 39:
        return 0
    ssiz = data[at + 4 + 38]  # after Lsiz, Rsiz, eight 32-bit sizes and offsets, and Csiz
    if ssiz & 0x80:
        raise DecodeError(
            f"{(ssiz & 0x7F) + 1}-bit signed samples are not supported: convert the file to unsigned ones"
        )
    return (ssiz & 0x7F) + 1


def _jpeg2000_pixels(data: bytes, img: Image.Image, depth: int) -> np.ndarray:
    """A JPEG 2000's stored 9- to 16-bit pixels as HxW or HxWxC uint16, by OpenJPEG (imagecodecs),
    values spread over 16 bits: Pillow reads such colour as 8 bits, 16-bit colour as black."""
    h, w = img.height, img.width
    pixels = imagecodecs.jpeg2k_decode(jp2.without_profile(data))  # as stored, as Pillow reads 8 bits
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.shape[:2] != (h, w) or pixels.ndim > 3 or channels > 4 or pixels.dtype.kind != "u":
        raise DecodeError(
            f"{depth}-bit pixels decoded as {pixels.shape} {pixels.dtype}, where the header says {(h, w)}"
        )
    return _spread(pixels.astype(np.uint16, copy=False), depth)


def _spread(pixels: np.ndarray, bits: int) -> np.ndarray:
    """`pixels` of `bits` (8 to 16) bits, 0..2^bits-1, spread over 0..65535 (the top bits repeated below)."""
    return pixels if bits >= 16 else (pixels << (16 - bits)) | (pixels >> (2 * bits - 16))


def _duration(img: Image.Image) -> int:
    """The current frame's duration in milliseconds, as the file states it (0 when it does not)."""
    try:
        return max(0, min(int(img.info.get("duration") or 0), 2**31 - 1))
    except (TypeError, ValueError, OverflowError):
        return 0


def _loop(value: Any) -> int | None:
    """How often an animation plays as Pillow reports it (GIF's NETSCAPE count, APNG's plays,
    WebP's loop count; 0: forever), or None where the file says nothing."""
    try:
        return max(0, min(int(value), 65535)) if value is not None else None
    except (TypeError, ValueError, OverflowError):
        return None


def _metadata(img: Image.Image) -> Metadata:
    """The metadata of an image as stored (before exif_transpose). A part that cannot be read is left
    out: metadata never costs an image."""
    info = img.info
    try:
        exif = img.getexif()
    except Exception:  # noqa: BLE001 - whatever a broken EXIF block raises, the pixels are what count
        exif = Image.Exif()
    icc = _profile_of_pixels(img, info.get("icc_profile"))
    # Text chunks may follow the pixels: PngImageFile.text reads to the end, through every frame of
    # an animated PNG, whose text _decode reads once it has decoded them all.
    described = _described(
        exif,
        icc=icc,
        xmp=info.get("xmp", info.get("XML:com.adobe.xmp")),
        # A JPEG whose JFIF unit is 0 states only an aspect ratio, which Pillow reports as "dpi".
        dpi=_dpi(info.get("dpi")) if info.get("jfif_unit") != 0 else None,
        text=_png_text(img) if not getattr(img, "is_animated", False) else (),
        iptc=_iptc(img),
    )
    return replace(described, png_colour=_png_colour(img))


def _tiff_metadata(data: bytes) -> Metadata:
    """The metadata of a TIFF Pillow cannot open, from its first page's tags: Pillow's EXIF reader
    takes a TIFF file as it takes EXIF (which is a TIFF structure)."""
    try:
        tags = Image.Exif()
        tags.load(data)
        iptc = tags.get(_TIFF_IPTC)
        return _described(tags, icc=tags.get(34675), xmp=tags.get(700), iptc=iptc if isinstance(iptc, bytes) else None)
    except Exception:  # noqa: BLE001 - tags that cannot be read are left out, the image is not
        return Metadata()


def _jp2_metadata(data: bytes, img: Image.Image) -> Metadata:
    """The metadata of a JPEG 2000: its boxes (jp2.read), and the resolution Pillow reads."""
    boxes = jp2.read(data)
    exif, icc = Image.Exif(), _profile_of_pixels(img, boxes.get("icc"))
    with contextlib.suppress(Exception):  # EXIF that cannot be read is left out, the image is not
        exif.load(boxes.get("exif"))
    return _described(exif, icc=icc, xmp=boxes.get("xmp"), dpi=_dpi(img.info.get("dpi")), iptc=boxes.get("iptc"))


def _described(
    exif: Image.Exif, *, icc: Any, xmp: Any, dpi: tuple[float, float] | None = None, text: tuple = (), iptc: Any = None
) -> Metadata:
    """Metadata from an image's EXIF (or TIFF tags), ICC profile, XMP, resolution (else EXIF's),
    text and IPTC records, as stored: its resolution and XMP made upright."""
    try:
        orientation = int(exif.get(0x0112, 1))
    except (TypeError, ValueError):
        orientation = 1
    dpi = dpi or _dpi(_exif_dpi(exif))
    if dpi and orientation in _SWAPS_AXES:
        dpi = dpi[::-1]
    xmp = xmp.encode() if isinstance(xmp, str) else xmp if isinstance(xmp, bytes) else None
    for pattern in _XMP_ORIENTATION if xmp else ():  # the output is upright, whatever the input's XMP said
        xmp = re.sub(pattern, b"", xmp)
    return Metadata(
        icc_profile=icc if isinstance(icc, bytes) and icc else None,
        exif=_exif_kept(exif),
        xmp=xmp or None,
        dpi=dpi,
        text=text,
        iptc=iptc,
    )


def _png_text(img: Image.Image) -> tuple[tuple[str, str], ...]:
    """A PNG's text chunks that a PNG output can carry (keywords of 1-79 Latin-1 characters; not
    XMP or raw profiles, which travel on their own), () for other formats."""
    if not isinstance(img, PngImagePlugin.PngImageFile):
        return ()
    return tuple(
        (k, v)
        for k, v in img.text.items()
        if isinstance(v, str)
        and 0 < len(k) < 80
        and max(map(ord, k)) < 256
        and not k.startswith(("XML:", "Raw profile"))
    )


def _png_colour(img: Image.Image) -> tuple[bytes, ...]:
    """A PNG's gAMA, cHRM and sRGB chunks (type then data, as the file holds them), rebuilt from what
    Pillow read (values x 100,000, rounded back: exact); () for other formats or values out of range."""
    if not isinstance(img, PngImagePlugin.PngImageFile):
        return ()
    info, chunks = img.info, []
    with contextlib.suppress(TypeError, ValueError, struct.error):  # a broken chunk is left out
        if (gamma := info.get("gamma")) is not None:
            chunks.append(b"gAMA" + struct.pack(">I", round(gamma * 100000)))
    with contextlib.suppress(TypeError, ValueError, struct.error):
        if (white_and_primaries := info.get("chromaticity")) is not None:
            chunks.append(b"cHRM" + struct.pack(">8I", *(round(v * 100000) for v in white_and_primaries)))
    if info.get("srgb") in (0, 1, 2, 3):  # the rendering intent
        chunks.append(b"sRGB" + bytes([info["srgb"]]))
    return tuple(chunks)


def _iptc(img: Image.Image) -> bytes | None:
    """The image's IPTC records (a JPEG's Photoshop block, a TIFF's IPTC tag) as one IPTC stream,
    or None. Pillow reads them but writes none, so they are put back together here: each record is
    0x1C, record and dataset numbers, a 2-byte length and the value (IPTC-NAA IIM 4.2, 1.5)."""
    try:
        records = IptcImagePlugin.getiptcinfo(img) or {}
        out = bytearray()
        for (record, dataset), values in records.items():
            for value in values if isinstance(values, list) else [values]:
                if len(value) < 0x8000:  # longer values take IIM's extended length: left out
                    out += struct.pack(">BBBH", 0x1C, record, dataset, len(value)) + value
        return bytes(out) or None
    except Exception:  # noqa: BLE001 - a broken IPTC block is left out, the image is not
        return None


def _with_iptc(jpeg: bytes, iptc: bytes) -> bytes:
    """A JPEG with `iptc` in a Photoshop APP13 segment (resource 0x0404), after the APPn segments
    Pillow wrote (JFIF, EXIF, XMP, ICC), or unchanged where it would not fit one segment."""
    resource = b"8BIM" + struct.pack(">H2xI", 0x0404, len(iptc)) + iptc + b"\0" * (len(iptc) % 2)  # no name, padded
    body = b"Photoshop 3.0\0" + resource
    if len(body) > 65533:
        return jpeg
    at = 2  # after SOI
    while jpeg[at] == 0xFF and 0xE0 <= jpeg[at + 1] <= 0xEF:
        at += 2 + struct.unpack(">H", jpeg[at + 2 : at + 4])[0]
    return jpeg[:at] + b"\xff\xed" + struct.pack(">H", len(body) + 2) + body + jpeg[at:]


def _dpi(value: Any) -> tuple[float, float] | None:
    try:
        x, y = float(value[0]), float(value[1])
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return None
    return (x, y) if 0 < x < 1e6 and 0 < y < 1e6 else None


def _exif_dpi(exif: Image.Exif) -> tuple[float, float] | None:
    """The resolution EXIF states in dots per inch (formats whose own header has none: WebP)."""
    per_inch = {2: 1.0, 3: 2.54}.get(exif.get(0x0128, 2))  # ResolutionUnit: inch (the default) or cm
    x, y = exif.get(_RESOLUTION[0]), exif.get(_RESOLUTION[1])
    return None if per_inch is None or x is None or y is None else (float(x) * per_inch, float(y) * per_inch)


def _exif_kept(source: Image.Exif) -> bytes | None:
    """EXIF reduced to _EXIF_KEPT and its Exif and GPS IFDs, or None."""
    try:
        exif = Image.Exif()
        for tag in _EXIF_KEPT & set(source):
            exif[tag] = source[tag]
        if str(exif.get(0x010E, "")).startswith(_LAYOUT_DESCRIPTIONS):
            del exif[0x010E]
        ifds = {
            p: {t: v for t, v in source.get_ifd(p).items() if t not in _EXIF_DROPPED} for p in (_EXIF_IFD, _GPS_IFD)
        }
        for pointer, ifd in ifds.items():
            if ifd:
                exif.get_ifd(pointer).update(ifd)
        return exif.tobytes() if len(exif) or any(ifds.values()) else None
    except Exception:  # noqa: BLE001 - a broken EXIF block is left out, the image is not
        return None


_SIXTEEN_BIT_LAYOUTS = {"RGB": 3, "RGBA": 4, "LA": 2}  # Pillow's raw mode -> channels kept


def _sixteen_bit_channels(img: Image.Image) -> int:
    """The channels of a 16-bit RGB, RGBA or grey-and-alpha PNG, whose pixels Pillow would reduce
    to 8 bits, else 0. Read from the tile Pillow is about to decode (its raw mode, e.g. "RGB;16B"),
    so before any loading. (For a TIFF Pillow reads, which is one tifffile cannot parse: 1 where its
    colour is 16-bit, premultiplied and CMYK included, which Pillow would read at 8 bits.)"""
    args = img.tile[0].args if img.tile and img.format in ("PNG", "TIFF") else None
    rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
    if not isinstance(rawmode, str) or ";16" not in rawmode or img.mode.startswith("I"):
        return 0
    return _SIXTEEN_BIT_LAYOUTS.get(rawmode.split(";")[0], 0) if img.format == "PNG" else 1


def _sixteen_bit_pixels(data: bytes, img: Image.Image, channels: int) -> np.ndarray:
    """The stored (not yet upright) 16-bit pixels of the PNG `img`, whose bytes are `data`, by libpng."""
    h, w = img.height, img.width
    pixels = imagecodecs.png_decode(data)
    pixels = pixels[..., :channels] if pixels.ndim == 3 else pixels
    if pixels.shape != (h, w, channels) or pixels.dtype.kind != "u" or pixels.itemsize != 2:
        raise DecodeError(
            f"16-bit pixels decoded as {pixels.shape} {pixels.dtype}, where the header says {(h, w, channels)} uint16"
        )
    return pixels.astype(np.uint16, copy=False)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation ImageOps.exif_transpose applies (XMP's where EXIF has none), 1 if unreadable."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the pixels as stored
        return 1


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """`pixels` turned as ImageOps.exif_transpose turns an image of EXIF `orientation`."""
    turned = {
        2: lambda p: p[:, ::-1],  # mirrored
        3: lambda p: p[::-1, ::-1],  # upside down
        4: lambda p: p[::-1],
        5: lambda p: p.swapaxes(0, 1),  # transposed
        6: lambda p: np.rot90(p, -1),  # on its left side: a quarter clockwise
        7: lambda p: p[::-1, ::-1].swapaxes(0, 1),  # transverse
        8: lambda p: np.rot90(p, 1),
    }.get(orientation)
    return turned(pixels).copy() if turned else pixels


def _pillow_pixels(img: Image.Image) -> np.ndarray:
    """The pixels of Pillow's current frame, upright, in one of the tiler's layouts (_to_array); a
    CMYK frame in sRGB by its ICC profile (_cmyk_to_srgb), which exif_transpose does not keep."""
    icc = img.info.get("icc_profile")
    img = ImageOps.exif_transpose(img)
    if img.mode == "CMYK" and (transform := _cmyk_to_srgb(icc)):
        img = ImageCms.applyTransform(img, transform)
    return _to_array(img)


def _to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in _RGB_MODES:
        img = img.convert("RGB")
    elif mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(img)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise DecodeError("32-bit integer pixels outside the 16-bit range are not supported")
        return pixels.astype(np.uint16)
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        raise DecodeError(f"pixel mode {mode!r} is not supported (supported: L, LA, RGB, RGBA, P, I;16, CMYK)")
    return np.asarray(img)


def _icc_space(icc: Any) -> bytes | None:
    """The colour space an ICC profile describes (b"RGB ", b"GRAY", b"CMYK", b"Lab " ...: bytes 16-19
    of its header, ICC.1 7.2), or None where `icc` is no profile (its header lacks "acsp")."""
    return icc[16:20] if isinstance(icc, bytes) and len(icc) >= 128 and icc[36:40] == b"acsp" else None


@functools.lru_cache(maxsize=1)
def _srgb_profile() -> bytes:
    """LittleCMS's built-in sRGB profile (ICC v4, 588 bytes), what CMYK photos are converted into,
    with a fixed creation date (header bytes 24-35; it is made anew, dated now, in each process):
    the same input gives the same output bytes on any worker, on any day."""
    made = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return made[:24] + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + made[36:]


def _profile_of_pixels(img: Image.Image, icc: Any) -> Any:
    """The ICC profile of the pixels _pillow_pixels makes of `img`, whose file states `icc`: sRGB's
    for a CMYK frame it converts by that profile, else `icc` itself."""
    return _srgb_profile() if img.mode == "CMYK" and _cmyk_to_srgb(icc) else icc


def _cmyk_to_srgb(icc: Any) -> ImageCms.ImageCmsTransform | None:
    """LittleCMS's conversion (perceptual) from the inks the CMYK profile `icc` describes into sRGB,
    or None where `icc` is no CMYK profile or one LittleCMS cannot use. Pillow's own CMYK to RGB
    ignores the profile (R = 255 - C - K, ...): a print scan's colours would shift, and its CMYK
    profile, carried onto RGB pixels, would be one that viewers reject."""
    return _cmyk_transform(icc) if _icc_space(icc) == b"CMYK" else None


@functools.lru_cache(maxsize=8)  # a press archive's files share a few profiles: each is built once
def _cmyk_transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), "CMYK", "RGB")
    except Exception:  # noqa: BLE001 - a profile LittleCMS cannot use: Pillow's formula, and no profile
        return None


def _profile_fitted(metadata: Metadata | None, grey: bool) -> Metadata | None:
    """`metadata` without its ICC profile where that describes other colours than the output's
    pixels, grey or RGB (a CMYK or Lab profile on RGB, an RGB one on grey; a block that is no
    profile): libpng and viewers reject such a profile, and the pixels are in none of its colours."""
    if metadata is None or metadata.icc_profile is None:
        return metadata
    if _icc_space(metadata.icc_profile) == (b"GRAY" if grey else b"RGB "):
        return metadata
    return replace(metadata, icc_profile=None)


_MAX_SIDE = {"WEBP": 16383, "JPEG": 65535}  # the formats' own limits
PNG_COMPRESS_LEVEL = 1
LIBPNG_MAX_SIDE = 1_000_000  # libpng's default user limit, which it applies when writing too; PNG's own is 2**31 - 1
# libaom's fastest: 7-14x faster than Pillow's default speed 6 (which encodes 1.2-1.5 MP/s a core,
# 10x slower than any other output), for files 14-18 % larger and 0.2-0.4 dB lower at quality 95
# (four photos, RESULTS.md). AVIF at speed 6 would bind a GPU node's encoding many times over.
AVIF_SPEED = 10


def encode(pixels: np.ndarray, fmt: str, *, metadata: Metadata | None = None, quality: int = 95) -> bytes:
    """Encode an array (layouts as `decode` returns) in Pillow format `fmt`, with what of `metadata`
    the format holds (_metadata_options). PNG, TIFF and JPEG 2000 keep 16 bits; JPEG, WebP, AVIF and
    BMP hold 8, to which 16-bit is reduced; JPEG and BMP hold no alpha, which is composited onto
    white. Raises ValueError for an image larger than the format can hold."""
    fmt = "PNG" if fmt == "GIF" else fmt
    if error := _too_large(pixels.shape[:2], fmt):
        raise ValueError(error)
    metadata = _profile_fitted(metadata, grey=pixels.ndim == 2 or pixels.shape[2] == 2)
    if pixels.dtype == np.uint16 and fmt in ("JPEG", "WEBP", "BMP", "AVIF"):
        pixels = (pixels // 257).astype(np.uint8)
    if fmt == "PNG":
        return _png(pixels, metadata)
    if pixels.dtype == np.uint16 and pixels.ndim == 3:
        return _sixteen_bit(pixels, fmt, metadata)
    img = Image.fromarray(pixels)
    if fmt in ("JPEG", "BMP") and img.mode in ("LA", "RGBA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB" if img.mode == "RGBA" else "L")
    options: dict[str, Any] = {}
    if fmt in ("JPEG", "WEBP", "AVIF"):
        options["quality"] = quality
    data = _save(img, fmt, options, metadata)
    if fmt == "JPEG" and metadata and metadata.iptc:
        return _with_iptc(data, metadata.iptc)
    return data


def encode_frames(frames: list[np.ndarray], fmt: str, *, metadata: Metadata | None = None, quality: int = 95) -> bytes:
    """Several frames (layouts as `decode` returns) as one file in Pillow format `fmt`: a TIFF of one
    page each, in its own layout, or an animated PNG (as for GIF inputs) or WebP with `metadata`'s
    timing, at 8 bits, every frame in the widest layout among them. One frame is `encode`'s. Raises
    ValueError where `fmt` holds one picture (JPEG, BMP), or where frames of different sizes would
    have to make an animation."""
    if len(frames) == 1:
        return encode(frames[0], fmt, metadata=metadata, quality=quality)
    fmt = "PNG" if fmt == "GIF" else fmt
    if fmt == "TIFF":
        # Pillow's appending writer moves every offset of a page but those inside EXIF's own IFDs
        # (Exif, GPS): pages after the first carry the rest of the metadata, not EXIF.
        later = replace(metadata, exif=None) if metadata else None
        buffer = io.BytesIO()
        with TiffImagePlugin.AppendingTiffWriter(buffer) as tiff:
            for i, frame in enumerate(frames):
                tiff.write(encode(frame, "TIFF", metadata=metadata if i == 0 else later))
                tiff.newFrame()
        return buffer.getvalue()
    if error := frames_unfit([f.shape[:2] for f in frames], fmt):
        raise ValueError(error)
    images = _same_layout(frames)
    metadata = _profile_fitted(metadata or Metadata(), grey=images[0].mode in ("L", "LA"))
    options: dict[str, Any] = {"save_all": True, "append_images": images[1:]}
    options["loop"] = 1 if metadata.loop is None else metadata.loop  # said nothing: plays once
    if len(metadata.durations) == len(frames):
        options["duration"] = list(metadata.durations)
    if fmt == "PNG":
        options["compress_level"] = PNG_COMPRESS_LEVEL
    else:
        options["quality"] = quality
    return _save(images[0], fmt, options, metadata)


def frames_unfit(sizes: list[tuple[int, ...]], fmt: str) -> str | None:
    """Why frames of these (height, width) sizes cannot be one file in Pillow format `fmt`, or None."""
    fmt = "PNG" if fmt == "GIF" else fmt
    if len(sizes) == 1 or fmt == "TIFF":
        return None
    if fmt not in _ANIMATED_OUTPUTS:
        return f"{fmt} holds one picture and this input has {len(sizes)}: choose --format tiff, png, webp or avif"
    if len(set(sizes)) > 1:
        return f"its {len(sizes)} pages differ in size, which an animated {fmt} cannot hold: choose --format tiff"
    return _too_large(sizes[0], fmt)


def _too_large(size: tuple[int, ...], fmt: str) -> str | None:
    """Why `fmt` cannot hold an image of `size` (height, width) pixels (its side limit), or None."""
    h, w = size
    if max(h, w) <= _MAX_SIDE.get(fmt, max(h, w)):
        return None
    return f"{fmt} cannot hold {w}x{h} pixels (at most {_MAX_SIDE[fmt]} per side); choose --format png or tiff"


def _same_layout(frames: list[np.ndarray]) -> list[Image.Image]:
    """Frames as 8-bit Pillow images of one mode, the widest among them (an animation has one)."""
    eight = [(f // 257).astype(np.uint8) if f.dtype == np.uint16 else f for f in frames]
    colour = any(f.ndim == 3 and f.shape[2] >= 3 for f in eight)
    alpha = any(f.ndim == 3 and f.shape[2] in (2, 4) for f in eight)
    mode = ("RGBA" if alpha else "RGB") if colour else ("LA" if alpha else "L")
    return [Image.fromarray(f).convert(mode) for f in eight]


def _save(img: Image.Image, fmt: str, options: dict[str, Any], metadata: Metadata | None) -> bytes:
    """`img` saved by Pillow with `options` and what of `metadata` `fmt` holds; AVIF at AVIF_SPEED."""
    buffer = io.BytesIO()
    if fmt == "AVIF":
        options = {**options, "speed": AVIF_SPEED}
    if fmt == "JPEG2000":  # Pillow writes a JP2's pixels alone (reversible wavelet: lossless)
        img.save(buffer, format=fmt, **options)
        return _jp2_with(buffer.getvalue(), metadata)
    try:
        img.save(buffer, format=fmt, **options, **_metadata_options(metadata or Metadata(), fmt))
    except Exception:  # metadata Pillow cannot write (odd EXIF types, say) never costs the image
        if metadata is None:
            raise
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png(pixels: np.ndarray, metadata: Metadata | None) -> bytes:
    """Grey or colour, with or without alpha, at 8 or 16 bits, as a PNG with `metadata`: libpng
    (imagecodecs) encodes the pixels, and the chunks Pillow writes for the metadata (of a 1x1 image
    of the same layout) go in beside them. Pillow holds 16-bit colour in no mode, and its own encoder
    tries every filter on every row: libpng with the Paeth filter alone and zlib's run-length
    strategy, at level 1, writes a photo upscaled x4 about 2x as fast as Pillow at level 1, in 13-16 %
    fewer bytes (fewer than Pillow's default level 6 too; RESULTS.md, "Decode and encode"). Encoding
    16x the input's pixels is the stage that binds beside a GPU; PNG stays lossless at any setting."""
    mode = "L" if pixels.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    if max(pixels.shape[:2]) > LIBPNG_MAX_SIDE:  # libpng refuses such an image ("Invalid IHDR data")
        if pixels.dtype == np.uint16 and pixels.ndim == 3:
            h, w = pixels.shape[:2]
            raise ValueError(
                f"a 16-bit colour PNG of {w}x{h} pixels: libpng, its only writer here, takes at most "
                f"{LIBPNG_MAX_SIDE:,} pixels per side; choose --format tiff"
            )
        return _save(Image.fromarray(pixels), "PNG", {"compress_level": PNG_COMPRESS_LEVEL}, metadata)
    chunks = _png_chunks(_save(Image.new(mode, (1, 1)), "PNG", {}, metadata))
    if not pixels.flags.c_contiguous or min(pixels.strides) <= 0:  # libpng takes rows in order,
        pixels = pixels.copy()  # as numpy says a 1x1 view is C-ordered whatever its strides
    options = {
        "level": PNG_COMPRESS_LEVEL,
        "filter": imagecodecs.PNG.FILTER.PAETH,
        "strategy": imagecodecs.PNG.STRATEGY.RLE,
    }
    try:
        pixels_png = imagecodecs.png_encode(pixels, **options)
    except imagecodecs.PngError as e:
        # imagecodecs guesses the file's size from the pixels' and fails where a small incompressible
        # image comes out larger ("output stream too small": a noisy column 151x1, whose rows are a
        # filter byte and 2 bytes each). Then it gets deflate's own bound: the rows stored, 1 % and headers.
        if "too small" not in str(e):
            raise
        stored = pixels.shape[0] + pixels.nbytes  # a filter byte a row
        pixels_png = imagecodecs.png_encode(pixels, **options, out=stored + stored // 100 + 4096)
    ancillary = b"".join(c for kind, c in chunks if kind not in (b"IHDR", b"IDAT", b"IEND"))
    header = _png_chunks(pixels_png)[0][1]  # IHDR comes first
    return pixels_png[:8] + header + ancillary + pixels_png[8 + len(header) :]


def _sixteen_bit(pixels: np.ndarray, fmt: str, metadata: Metadata | None) -> bytes:
    """16-bit colour, or grey with alpha (HxWx2, x3, x4 uint16), as a TIFF or JPEG 2000 with
    `metadata`. Pillow holds such pixels in no mode, but writes every metadata block isosr carries: a
    TIFF is Pillow's own, written from the 8-bit image, with its strips rewritten at 16 bits and the
    tags that say so changed by tifffile."""
    mode = {2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    if fmt == "JPEG2000":  # OpenJPEG, lossless (Pillow writes 16-bit grey alone)
        return _jp2_with(imagecodecs.jpeg2k_encode(np.ascontiguousarray(pixels), level=0, codecformat="jp2"), metadata)
    tiff = io.BytesIO(_save(Image.fromarray((pixels >> 8).astype(np.uint8), mode), "TIFF", {}, metadata))
    with tifffile.TiffFile(tiff) as tif:
        page, order = tif.pages[0], tif.byteorder
        counts = [2 * c for c in page.databytecounts]
        start = page.dataoffsets[0]
        if start + sum(page.databytecounts) != len(tiff.getvalue()):  # Pillow writes the strips last
            raise ValueError("Pillow's TIFF does not end with its strips")
        offsets = list(itertools.accumulate(counts[:-1], initial=start))
        for tag, value in ((258, (16,) * pixels.shape[2]), (273, offsets), (279, counts)):
            old = page.tags[tag]
            if old.overwrite(value).valueoffset != old.valueoffset:  # a longer value would go among the pixels
                raise ValueError(f"TIFF tag {tag} moved when rewritten")
    tiff.truncate(start)
    tiff.seek(start)
    tiff.write(pixels.astype(order + "u2", copy=False).tobytes())
    return tiff.getvalue()


def _jp2_with(data: bytes, metadata: Metadata | None) -> bytes:
    """A JP2 file with `metadata`'s ICC profile, XMP, IPTC, EXIF and resolution in its boxes (jp2.write)."""
    m = metadata or Metadata()
    return jp2.write(data, icc=m.icc_profile, xmp=m.xmp, iptc=m.iptc, exif=m.exif, dpi=m.dpi)


def _png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk: length, type, data and CRC) for each chunk of a PNG."""
    chunks, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        chunks.append((png[at + 4 : at + 8], png[at : at + 12 + length]))
        at += 12 + length
    return chunks


def _metadata_options(metadata: Metadata, fmt: str) -> dict[str, Any]:
    """Pillow's save options that write `metadata` in `fmt` (JPEG 2000's go in its boxes instead:
    _jp2_with): every format but BMP holds the ICC profile, EXIF and XMP (JPEG up to one marker
    segment of each: larger blocks are left out); PNG, TIFF, JPEG and BMP the resolution; PNG its
    text and colour chunks; TIFF the IPTC records (a JPEG's are added to the encoded file,
    _with_iptc)."""
    m = metadata
    options: dict[str, Any] = {}
    if m.icc_profile and fmt != "BMP":
        options["icc_profile"] = m.icc_profile
    if m.dpi and fmt in ("PNG", "TIFF", "JPEG", "BMP") and (fmt != "JPEG" or max(m.dpi) < 65535):
        options["dpi"] = m.dpi  # JPEG's JFIF header holds 16-bit densities
    exif, xmp = m.exif, m.xmp
    if fmt == "JPEG":
        exif = exif if exif and len(exif) <= _JPEG_MAX_EXIF else None
        xmp = xmp if xmp and len(xmp) <= _JPEG_MAX_XMP else None
    if fmt == "TIFF":
        if exif or xmp or m.iptc:
            tags = Image.Exif()
            if exif:
                tags.load(exif)
            if xmp:
                tags[700] = xmp  # TIFF's XMP tag
            if m.iptc:
                tags[_TIFF_IPTC] = m.iptc
            options["exif"] = tags
    elif fmt != "BMP":
        if exif:
            options["exif"] = exif
        if xmp and fmt in ("JPEG", "WEBP", "AVIF"):
            options["xmp"] = xmp
    if fmt == "PNG" and (m.text or xmp or m.png_colour):
        info = PngImagePlugin.PngInfo()
        for chunk in m.png_colour:  # Pillow writes them before the pixels, and no sRGB beside a profile
            info.add(chunk[:4], chunk[4:])
        for key, value in m.text:
            info.add_text(key, value, zip=len(value) > 1024)
        if xmp:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"), zip=True)
        options["pnginfo"] = info
    return options
