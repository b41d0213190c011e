"""Image files <-> arrays the tiler takes, with Pillow.

Decoding applies the EXIF orientation and maps every Pillow mode to one of the tiler's layouts:
  L -> HxW uint8; LA -> HxWx2; RGB -> HxWx3; RGBA -> HxWx4; I;16* / I (16-bit grey) -> HxW uint16;
  1 -> L; P -> RGBA if it has transparency, else RGB; PA -> RGBA; CMYK, YCbCr, LAB, HSV -> RGB.
The ICC profile travels with the image so the output keeps the input's colours.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Suffix -> Pillow format. Output defaults to the input's format (GIF becomes PNG: a palette of
# 256 colours would undo the upscale).
FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".gif": "GIF",
}
OUTPUT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".png"}
# decode() enforces --max-pixels itself, from the header, before any pixel is decoded; Pillow's own
# lower limit (~179 MP, an error at twice its warning level) would otherwise override it.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 200_000_000  # larger inputs are refused unless --max-pixels says otherwise
# The most bytes a pixel of a supported image takes in a file: 16-bit RGBA or CMYK, uncompressed
# (TIFF, BMP); and room for what else a file holds (ICC profiles, EXIF, thumbnails, other pages).
MAX_BYTES_PER_PIXEL, MAX_METADATA_BYTES = 8, 64 * 2**20
_RGB_MODES = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"}


def output_suffix(key: str, fmt: str) -> str:
    """The suffix an output in `fmt` gets: the input's own when it already names that format
    (photo.jpeg stays .jpeg, scan.tiff stays .tiff), else the format's usual one."""
    suffix = ("." + key.rsplit(".", 1)[-1]) if "." in key.rsplit("/", 1)[-1] else ""
    return suffix if FORMATS.get(suffix.lower()) == fmt else OUTPUT_SUFFIX[fmt]


def output_format(key: str, requested: str | None = None) -> str:
    """The Pillow format an input's output is written in: `requested`, else the format its suffix
    names (GIF becomes PNG), else PNG."""
    if requested:
        return requested
    fmt = FORMATS.get(("." + key.rsplit(".", 1)[-1].lower()) if "." in key else "", "PNG")
    return "PNG" if fmt == "GIF" else fmt


def output_format_of(decoded_format: str, requested: str | None = None) -> str:
    """The format an image known only by its bytes is written in (a shard's row has no suffix):
    `requested`, else the format Pillow decoded when isosr writes it (MPO, JPEG's multi-picture
    variant, as JPEG; GIF as PNG, as for files), else PNG."""
    if requested:
        return requested
    fmt = {"MPO": "JPEG"}.get(decoded_format, decoded_format)
    return fmt if fmt in OUTPUT_SUFFIX and fmt != "GIF" else "PNG"


class DecodeError(ValueError):
    """An input that is not a usable image; the message says why."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # HxW, HxWx2, x3 or x4; uint8 or uint16
    format: str  # Pillow format of the source, e.g. "PNG"
    icc_profile: bytes | None


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
    """Decode image bytes (first frame of animations). Raises DecodeError (its message starting with
    `name`, when given) for empty, truncated or unknown data, unsupported modes, and images above
    `max_pixels`."""
    try:
        return _decode(data, max_pixels)
    except DecodeError as e:
        raise DecodeError(f"{name}: {e}" if name else str(e)) from None


def _decode(data: bytes, max_pixels: int | None) -> Decoded:
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise DecodeError(
                    f"{img.width}x{img.height} = {img.width * img.height} pixels is above the "
                    f"limit of {max_pixels}; raise --max-pixels if this image is expected"
                )
            fmt = img.format or "PNG"
            icc = img.info.get("icc_profile")
            img.seek(0)
            img = ImageOps.exif_transpose(img)
            pixels = _to_array(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image in any supported format (PNG, JPEG, WebP, TIFF, BMP, GIF)") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types on hostile files
        raise DecodeError(f"not a readable image ({type(e).__name__}: {e})") from None
    return Decoded(pixels, fmt, icc)


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


_MAX_SIDE = {"WEBP": 16383, "JPEG": 65535}  # the formats' own limits
PNG_COMPRESS_LEVEL = 1


def encode(pixels: np.ndarray, fmt: str, *, icc_profile: bytes | None = None, quality: int = 95) -> bytes:
    """Encode an array (layouts as `decode` returns) in Pillow format `fmt`. JPEG cannot hold alpha
    or 16 bits: alpha is composited onto white and 16-bit is reduced to 8-bit for it. Raises
    ValueError for an image larger than the format can hold."""
    fmt = "PNG" if fmt == "GIF" else fmt
    h, w = pixels.shape[:2]
    if max(h, w) > _MAX_SIDE.get(fmt, max(h, w)):
        raise ValueError(
            f"{fmt} cannot hold {w}x{h} pixels (at most {_MAX_SIDE[fmt]} per side); choose --format png or tiff"
        )
    img = Image.fromarray(pixels)
    if fmt in ("JPEG", "BMP") and img.mode in ("LA", "RGBA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB" if img.mode == "RGBA" else "L")
    if fmt in ("JPEG", "WEBP", "BMP") and pixels.dtype == np.uint16:
        img = Image.fromarray((pixels // 257).astype(np.uint8))
    options: dict[str, object] = {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = quality
    if fmt == "PNG":
        # zlib level 1: 5x faster than Pillow's default 6 and 1.5x faster than 3, for files 13 % and
        # 4 % larger (jobs/bench.py codecs, RESULTS.md). Encoding 16x the input's pixels is the CPU
        # stage that binds beside a GPU; PNG stays lossless at any level.
        options["compress_level"] = PNG_COMPRESS_LEVEL
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()
