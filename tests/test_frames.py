"""Files of several pictures: the pages of a multi-page TIFF (scanned documents, a book's pages) and
the frames of an animated GIF, PNG or WebP. Every one is decoded, upright in its own layout, and
written back as one file with the animation's timing. Before, only the first was decoded and
upscaled, and the rest were dropped without a word (the manifest said ok)."""

from __future__ import annotations

import io
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image, ImageSequence

from pipeline.images import DecodeError, Metadata, decode, encode_frames, frames_unfit


def crop(y: int, x: int, h: int, w: int) -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[y : y + h, x : x + w])


def scanned_book() -> tuple[bytes, list[np.ndarray]]:
    """A 3-page TIFF as scanners write them: an 8-bit colour page, a 48-bit colour page stored on its
    side (orientation 6), a grey page of another size. Returns the file and the pages upright."""
    colour = crop(0, 0, 40, 60)
    deep = (crop(100, 100, 30, 50).astype(np.uint16) * 257) ^ np.uint16(0x55)  # low bytes of their own
    grey = crop(200, 200, 24, 18)[..., 1]
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(colour, photometric="rgb", resolution=(300, 300), extratags=[(0x010F, 2, 0, "Epson", True)])
        tif.write(deep, photometric="rgb", compression="zlib", extratags=[(0x0112, 3, 1, 6, True)])
        tif.write(grey, photometric="minisblack")
    return buffer.getvalue(), [colour, np.rot90(deep, -1), grey]


def test_every_page_of_a_tiff_is_read_upright_in_its_own_layout() -> None:
    data, pages = scanned_book()
    out = decode(data)
    assert len(out.frames) == 3 and out.format == "TIFF"
    for i, (got, want) in enumerate(zip(out.frames, pages)):
        assert got.dtype == want.dtype and got.shape == want.shape, i
        np.testing.assert_array_equal(got, want, err_msg=f"page {i + 1}")
    assert out.metadata.dpi == (300.0, 300.0) and out.metadata.durations == ()


def test_pages_written_as_one_tiff_keep_every_level_and_the_first_pages_exif() -> None:
    _, pages = scanned_book()
    exif = Image.Exif()
    exif[0x010F] = "Epson"
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"
    written = encode_frames(pages, "TIFF", metadata=Metadata(exif=exif.tobytes(), dpi=(1200.0, 1200.0)))
    with tifffile.TiffFile(io.BytesIO(written)) as tif:
        assert len(tif.pages) == 3
        for i, (page, want) in enumerate(zip(tif.pages, pages)):
            np.testing.assert_array_equal(page.asarray(), want, err_msg=f"page {i + 1}")  # lossless, 16 bits too
    with Image.open(io.BytesIO(written)) as img:
        for i in range(3):
            img.seek(i)
            assert img.info["dpi"] == (1200, 1200), i
            # Pillow's appending writer would leave later pages' Exif IFD pointers aimed into page 1
            assert (img.getexif().get_ifd(0x8769).get(0x9003) is not None) == (i == 0), i


def animated_gif(loop: int | None) -> tuple[bytes, list[np.ndarray]]:
    """Three 48x64 frames of different content, 40, 80 and 120 ms. Returns the file and the frames as
    Pillow composes them (RGB)."""
    frames = [Image.fromarray(crop(y, y, 48, 64)).convert("P", palette=Image.Palette.ADAPTIVE) for y in (0, 150, 300)]
    buffer = io.BytesIO()
    options = {"loop": loop} if loop is not None else {}
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=[40, 80, 120], **options)
    with Image.open(io.BytesIO(buffer.getvalue())) as img:
        composed = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)]
    return buffer.getvalue(), composed


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_animation_keeps_its_frames_and_timing(fmt: str) -> None:
    data, composed = animated_gif(loop=0)
    out = decode(data)
    assert len(out.frames) == 3 and out.metadata.durations == (40, 80, 120) and out.metadata.loop == 0
    for i, (got, want) in enumerate(zip(out.frames, composed)):
        np.testing.assert_array_equal(got, want, err_msg=f"frame {i + 1}")
    written = encode_frames(list(out.frames), fmt, metadata=out.metadata)
    back = decode(written)
    assert len(back.frames) == 3 and back.metadata.durations == (40, 80, 120) and back.metadata.loop == 0
    for i, (got, want) in enumerate(zip(back.frames, composed)):
        # PNG is lossless; WebP at quality 95 within 8 levels (RMS), where the frames differ by ~60
        error = np.sqrt(np.mean((got.astype(float) - want) ** 2))
        assert error == 0 if fmt == "PNG" else error < 8, (i, error)


def test_an_animation_that_says_nothing_of_looping_still_plays_once() -> None:
    data, _ = animated_gif(loop=None)
    out = decode(data)
    assert out.metadata.loop is None
    with Image.open(io.BytesIO(encode_frames(list(out.frames), "PNG", metadata=out.metadata))) as apng:
        assert apng.n_frames == 3 and apng.info["loop"] == 1  # APNG's num_plays: 0 would be forever


def test_formats_of_one_picture_are_refused_with_what_to_choose() -> None:
    _, pages = scanned_book()
    sizes = [p.shape[:2] for p in pages]
    for fmt in ("JPEG", "BMP"):
        with pytest.raises(ValueError, match=f"{fmt} holds one picture and this input has 3: choose --format tiff"):
            encode_frames(pages, fmt)
    assert frames_unfit(sizes, "PNG") == (
        "its 3 pages differ in size, which an animated PNG cannot hold: choose --format tiff"
    )
    assert frames_unfit(sizes, "TIFF") is None and frames_unfit(sizes[:1], "JPEG") is None


def test_the_pixel_limit_counts_every_frame() -> None:
    data, _ = animated_gif(loop=0)
    assert len(decode(data, max_pixels=3 * 48 * 64).frames) == 3
    with pytest.raises(DecodeError, match=r"^anim.gif: 3 frames of 64x48 = 9216 pixels are above the limit of 9215;"):
        decode(data, name="anim.gif", max_pixels=3 * 48 * 64 - 1)
    book, _ = scanned_book()
    with pytest.raises(DecodeError, match=r"3 pages of 4332 pixels together are above the limit of 4000;"):
        decode(book, max_pixels=4000)


def test_a_page_that_cannot_be_read_fails_the_file_by_its_number() -> None:
    data, _ = scanned_book()
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        offset = tif.pages[1].dataoffsets[0]  # the zlib strip of page 2
    broken = data[:offset] + b"\0" * 16 + data[offset + 16 :]
    with pytest.raises(DecodeError, match=r"^book.tif: frame 2 of 3 is not readable"):
        decode(broken, name="book.tif")


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_a_sixteen_bit_colour_animated_png_is_refused_not_cut_to_eight_bits() -> None:
    """Pillow composes APNG frames at 8 bits and libpng reads only the first: refused, by name."""
    pixels = crop(0, 0, 8, 8).astype(np.uint16) * 257
    png = imagecodecs.png_encode(pixels)
    at, chunks = 8, {}
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        chunks.setdefault(png[at + 4 : at + 8], []).append(png[at + 8 : at + 8 + length])
        at += 12 + length
    control = struct.pack(">IIIIIHHBB", 0, 8, 8, 0, 0, 1, 10, 0, 0)  # sequence, size, offset, delay, ops
    data = b"".join(chunks[b"IDAT"])
    apng = (
        png[:8]
        + chunk(b"IHDR", chunks[b"IHDR"][0])
        + chunk(b"acTL", struct.pack(">II", 2, 0))
        + chunk(b"fcTL", control)
        + chunk(b"IDAT", data)
        + chunk(b"fcTL", struct.pack(">I", 1) + control[4:])
        + chunk(b"fdAT", struct.pack(">I", 2) + data)
        + chunk(b"IEND", b"")
    )
    with Image.open(io.BytesIO(apng)) as img:
        assert img.n_frames == 2  # a valid APNG, as Pillow reads it
    with pytest.raises(DecodeError, match=r"^clip.png: an animated PNG with 16-bit colour is not supported"):
        decode(apng, name="clip.png")


def test_an_animated_pngs_text_after_its_frames_is_kept() -> None:
    """Text chunks may follow the last frame; they are read once every frame is decoded."""
    frames = [Image.fromarray(crop(y, 0, 16, 16)) for y in (0, 50)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=[30, 60])
    apng = buffer.getvalue()
    apng = apng[:-12] + chunk(b"tEXt", b"Title\0Harbour at dusk") + apng[-12:]  # before IEND
    out = decode(apng)
    assert len(out.frames) == 2 and out.metadata.text == (("Title", "Harbour at dusk"),)
    with Image.open(io.BytesIO(encode_frames(list(out.frames), "PNG", metadata=out.metadata))) as written:
        assert written.n_frames == 2 and written.text == {"Title": "Harbour at dusk"}


def test_a_file_of_more_frames_than_isosr_takes_is_refused_before_decoding() -> None:
    """A frame costs at least a tile of network work, however small: 10,001 one-pixel frames would
    pass any pixel limit."""
    from pipeline.images import MAX_FRAMES

    frames = [Image.new("L", (1, 1), i % 2 * 255).convert("P") for i in range(MAX_FRAMES + 1)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(
        DecodeError, match=r"^dots.gif: 10001 pages or frames are more than isosr upscales from one file"
    ):
        decode(buffer.getvalue(), name="dots.gif")
