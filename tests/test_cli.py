"""`isosr upscale`, `isosr info` and `isosr demo` as a user runs them on local folders.

Commands that run the pipeline use the session's local Ray (conftest's `ray_local`: 2 CPUs, 1
logical GPU), which `isosr upscale` reuses instead of starting its own; usage errors must be
reported before any work starts, so those tests need no Ray.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageCms, IptcImagePlugin, PngImagePlugin

from pipeline.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, main
from tests.iptc import with_iptc


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    import skimage.data

    rng = np.random.default_rng(seed)
    astronaut = skimage.data.astronaut()
    y, x = rng.integers(0, 512 - h), rng.integers(0, 512 - w)
    return astronaut[y : y + h, x : x + w]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A nested folder of real-photo crops in the layouts and formats users have."""
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    rgb = photo(70, 90)
    Image.fromarray(rgb).save(src / "rgb.png")
    Image.fromarray(rgb).save(src / "nested" / "photo.jpg", quality=90)
    Image.fromarray(rgb[..., 1]).save(src / "nested" / "grey.png")
    rgba = np.dstack([rgb, np.linspace(0, 255, 70 * 90).reshape(70, 90).astype(np.uint8)])
    Image.fromarray(rgba).save(src / "nested" / "deeper" / "alpha.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(src / "grey16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "anim.gif")
    return src


EXPECTED = {  # input -> (output, mode, format)
    "rgb.png": ("rgb.png", "RGB", "PNG"),
    "nested/photo.jpg": ("nested/photo.jpg", "RGB", "JPEG"),
    "nested/grey.png": ("nested/grey.png", "L", "PNG"),
    "nested/deeper/alpha.png": ("nested/deeper/alpha.png", "RGBA", "PNG"),
    "grey16.png": ("grey16.png", "I;16", "PNG"),
    "anim.gif": ("anim.png", "RGB", "PNG"),
}


@pytest.mark.cluster
def test_upscale_mirrors_paths_sizes_modes_and_formats(
    ray_local: None, inputs: Path, tmp_path: Path, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "dst"
    (inputs / "nested" / "IMG_0001.CR2").write_bytes(b"a camera's raw file")  # not an image isosr reads
    (inputs / "nested" / "IMG_0002.CR2").write_bytes(b"a camera's raw file")
    status = main(["upscale", str(inputs), str(dst), "--checkpoint", tiny_checkpoint, "--batch-size", "5"])
    assert status == EXIT_OK
    for source, (output, mode, fmt) in EXPECTED.items():
        with Image.open(inputs / source) as before, Image.open(dst / output) as after:
            assert after.size == (4 * before.width, 4 * before.height), output
            assert after.mode == mode, output
            assert after.format == fmt, output
    outputs = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file() and "_isosr" not in p.parts)
    assert outputs == sorted(o for o, _, _ in EXPECTED.values())  # nothing else, no temporary files
    grey16 = np.asarray(Image.open(dst / "grey16.png"))
    assert grey16.dtype.itemsize == 2 and grey16.max() > 255  # 16-bit stays 16-bit

    out = capsys.readouterr()
    assert "inputs 6, ok 6, failed 0, skipped 0" in out.out
    assert re.search(r"MP in -> [\d.]+ MP out in [\d.]+ s \([\d.]+ output MP/s\)", out.out)
    assert re.search(r"consistency PSNR: min [\d.]+ dB, median [\d.]+ dB over 6 images", out.out)
    [run_dir] = re.findall(r"^manifest and report: (.+)$", out.out, re.MULTILINE)
    assert Path(run_dir).parent == dst / "_isosr" / "runs"
    assert {p.name for p in Path(run_dir).iterdir()} >= {"manifest.parquet", "report.json", "report.html"}
    assert sorted(pq.read_table(Path(run_dir) / "manifest.parquet").column("key").to_pylist()) == sorted(EXPECTED)
    assert "6 inputs to upscale" in out.err  # what the run is about to do, before the progress display
    assert "2 files under SRC are not image files of a format isosr reads and are left alone (2 .cr2)" in out.err


@pytest.mark.cluster
def test_awkward_names_and_kinds_of_file_are_each_upscaled_or_one_failed_row(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these used to end the run with a traceback, be left out of the manifest, or fail:
    a Latin-1 file name (b'caf\\xe9.png': UnicodeEncodeError before anything was done), a symbolic
    link to a photo (left out), a 251-byte name (its temporary's name was too long), a FIFO and a
    link to nothing (left out; a FIFO must never be opened: reading it would wait forever); and a
    file larger than any image of --max-pixels can be was read whole into a worker's memory."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    long = "n" * 247 + ".png"
    Image.fromarray(photo(40, 50)).save(src / "ok.png")
    Image.fromarray(photo(30, 30, seed=1)).save(os.fsencode(src) + b"/caf\xe9.png")
    Image.fromarray(photo(20, 30, seed=2)).save(src / long)
    (src / "link.png").symlink_to("ok.png")
    (src / "sub" / "up").symlink_to("..")  # a folder link: not followed, so no loop
    (src / "gone.png").symlink_to("nothing-here.png")
    os.mkfifo(src / "fi\nfo.png")  # a newline is allowed in a name; the summary shows it escaped
    with open(src / "huge.tif", "wb") as f:  # sparse: one byte more than any image of 200 MP takes
        f.truncate(200_000_000 * 8 + 64 * 2**20 + 1)
    assert main(["upscale", str(src), str(dst), "--checkpoint", tiny_checkpoint]) == EXIT_SOME_FAILED
    out = capsys.readouterr().out
    assert "inputs 7, ok 3, failed 4, skipped 0" in out
    assert "FAILED huge.tif: 1,667,108,865 bytes is more than an image of --max-pixels 200,000,000 pixels" in out
    assert "FAILED caf\\xe9.png: its name is not valid UTF-8" in out and "rename it" in out
    assert "FAILED fi\\nfo.png: not a regular file" in out
    assert "FAILED gone.png: a symbolic link to nothing-here.png, which does not exist" in out
    for name, size in [("ok.png", (200, 160)), ("link.png", (200, 160)), (long, (120, 80))]:
        with Image.open(dst / name) as upscaled:
            assert upscaled.size == size, name
    assert sorted(os.listdir(dst)) == sorted(["_isosr", "ok.png", "link.png", long])  # no temporaries
    assert not (dst / "link.png").is_symlink()
    [run_dir] = re.findall(r"^manifest and report: (.+)$", out, re.MULTILINE)
    rows = {r["key"]: r for r in pq.read_table(Path(run_dir) / "manifest.parquet").to_pylist()}
    assert rows.keys() == {"ok.png", "link.png", long, "caf\\xe9.png", "fi\nfo.png", "gone.png", "huge.tif"}
    assert all(
        rows[k]["status"] == "failed" and rows[k]["output"] is None for k in ("caf\\xe9.png", "fi\nfo.png", "huge.tif")
    )


XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/" '
       b'tiff:Orientation="6"><dc:creator>Ann Archivist</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>')  # fmt: skip


@pytest.mark.cluster
def test_outputs_keep_what_describes_the_photo_and_are_upright(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A phone photo stored on its side, a PNG with text chunks, a TIFF scan: each output is upright
    and keeps the ICC profile, EXIF (camera, date, GPS, copyright), XMP, IPTC keywords, PNG text
    and gamma and the physical size (4x the dots per inch); what described the stored file (orientation,
    maker note, pixel dimensions) does not follow it. The same as TIFF, through the band path."""
    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif.update({0x0112: 6, 0x010F: "Canon", 0x0110: "EOS R5", 0x8298: "(c) City Archive"})  # 6: turn 90° to show
    exif.get_ifd(0x8769).update({0x9003: "2021:06:01 12:00:00", 0xA002: 480, 0xA003: 40, 0x927C: b"vendor" * 20})
    exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 31.0, 12.5)})
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    options = {"exif": exif.tobytes(), "icc_profile": icc, "xmp": XMP, "dpi": (300, 300)}
    phone = io.BytesIO()
    Image.fromarray(photo(40, 480)).save(phone, "JPEG", **options)
    (src / "phone.jpg").write_bytes(with_iptc(phone.getvalue(), [b"harbour", b"1921"]))
    text = PngImagePlugin.PngInfo()
    text.add_text("Title", "Harbour, 1921")
    text.add_itxt("Description", "Hafen – Blick nach Süden")
    text.add(b"gAMA", (55556).to_bytes(4, "big"))  # a gamma of 1/1.8, as old Macs wrote
    Image.fromarray(photo(30, 20)).save(src / "text.png", pnginfo=text, dpi=(72, 72))
    scan = Image.Exif()
    scan.update({0x013B: "Scanner operator", 0x0112: 1})
    Image.fromarray(photo(20, 30)[..., 0]).save(src / "scan.tif", exif=scan, dpi=(600, 600))
    assert main(["upscale", str(src), str(tmp_path / "dst"), "--checkpoint", tiny_checkpoint]) == EXIT_OK
    # The phone photo alone, as TIFF: on 2 CPU actors it is cut into bands, which the sink stacks.
    alone = ["upscale", str(src / "phone.jpg"), str(tmp_path / "alone"), "--checkpoint", tiny_checkpoint]
    assert main([*alone, "--gpus-per-worker", "0", "--format", "tiff"]) == EXIT_OK
    phone = {}
    for run_dir in re.findall(r"^manifest and report: (.+)$", capsys.readouterr().out, re.MULTILINE):
        manifest = pq.read_table(Path(run_dir) / "manifest.parquet").to_pylist()
        phone[len(manifest)] = next(r for r in manifest if r["key"] == "phone.jpg")
        assert "staging" not in {p.name for p in Path(run_dir).iterdir()}  # the bands' folders, once stacked
    assert phone[1]["piece_count"] > 1, "not cut"  # alone: in bands
    assert phone[3]["piece_count"] == 1  # the largest of the three in dst: a round of its own, whole
    assert phone[1]["tiles"] == phone[3]["tiles"]  # no tile run twice

    for out_path in (tmp_path / "dst" / "phone.jpg", tmp_path / "alone" / "phone.tif"):
        with Image.open(out_path) as out:
            assert out.size == (4 * 40, 4 * 480)  # displayed orientation: 40 wide, 480 tall
            kept = out.getexif()
            assert kept.get(0x0112, 1) == 1  # upright already: a viewer must not turn it again
            assert (kept[0x010F], kept[0x0110], kept[0x8298]) == ("Canon", "EOS R5", "(c) City Archive")
            # the date kept, the pixel dimensions the output's, the maker note gone
            assert dict(kept.get_ifd(0x8769)) == {0x9003: "2021:06:01 12:00:00", 0xA002: 160, 0xA003: 1920}
            assert dict(kept.get_ifd(0x8825)) == {1: "N", 2: (52.0, 31.0, 12.5)}
            assert out.info["icc_profile"] == icc and out.info["dpi"] == (1200, 1200)
            assert b"<dc:creator>Ann Archivist</dc:creator>" in out.info["xmp"]
            assert b"Orientation" not in out.info["xmp"]
            assert IptcImagePlugin.getiptcinfo(out)[(2, 25)] == [b"harbour", b"1921"]
    with Image.open(tmp_path / "dst" / "text.png") as out:
        assert out.text == {"Title": "Harbour, 1921", "Description": "Hafen – Blick nach Süden"}
        assert out.info["dpi"] == pytest.approx((288, 288), abs=0.1)  # PNG stores whole dots per metre: 72.01 in
        assert out.info["gamma"] == 0.55556
    with Image.open(tmp_path / "dst" / "scan.tif") as out:
        assert out.getexif()[0x013B] == "Scanner operator" and out.info["dpi"] == (2400, 2400)


@pytest.mark.cluster
def test_sixteen_bit_colour_scans_come_out_sixteen_bit(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 48-bit TIFF scan stored on its side and a 64-bit RGBA PNG, as archives hold them, come out
    at 16 bits with every level, upright, at 4x the resolution. They came out 8-bit before:
    Pillow reads 16-bit colour as 8 bits. The scan runs on 2 CPU actors, cut into bands."""
    import imagecodecs
    import tifffile

    from model.metrics import bicubic_downscale_array

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    deep = photo(40, 480).astype(np.uint16) * 256 + np.random.default_rng(0).integers(0, 256, (40, 480, 3), np.uint16)
    tags = [(0x0112, 3, 1, 6, True), (0x010F, 2, 0, "Epson", True)]  # 6: turn 90° clockwise to show
    tifffile.imwrite(
        src / "scan.tif", deep, photometric="rgb", compression="zlib", resolution=(600, 600), extratags=tags
    )
    alpha = np.linspace(0, 65535, 30 * 20, dtype=np.uint16).reshape(30, 20)
    (src / "film.png").write_bytes(imagecodecs.png_encode(np.dstack([deep[:30, :20], alpha])))
    args = ["upscale", str(src), str(dst), "--checkpoint", tiny_checkpoint, "--gpus-per-worker", "0"]
    assert main(args) == EXIT_OK

    [run_dir] = re.findall(r"^manifest and report: (.+)$", capsys.readouterr().out, re.MULTILINE)
    manifest = {r["key"]: r for r in pq.read_table(Path(run_dir) / "manifest.parquet").to_pylist()}
    assert {k: r["mode"] for k, r in manifest.items()} == {"scan.tif": "RGB;16", "film.png": "RGBA;16"}
    upright = np.rot90(deep, -1)
    scan = tifffile.imread(dst / "scan.tif")
    film = imagecodecs.png_decode((dst / "film.png").read_bytes())
    assert scan.shape == (4 * 480, 4 * 40, 3) and film.shape == (4 * 30, 4 * 20, 4)
    for out in (scan, film):
        assert out.dtype == np.uint16 and np.count_nonzero(out % 257) > out.size // 2  # not 8 bits widened
    # The scan is the photo, upright: its downscale is within 3 % (RMS, 30.5 dB) of the input; the tiny
    # test model gives 1.7 %, the scan turned the other way 46 %.
    error = bicubic_downscale_array(scan).astype(np.float64) - upright
    assert np.sqrt(np.mean(error[8:-8, 8:-8] ** 2)) < 0.03 * 65535
    with Image.open(dst / "scan.tif") as out:
        assert out.info["dpi"] == (2400, 2400) and out.getexif()[0x010F] == "Epson"
        assert out.getexif().get(0x0112, 1) == 1


def test_metadata_a_format_cannot_hold_is_left_out_and_the_image_written() -> None:
    """EXIF larger than a JPEG marker segment (64 KB) goes into a PNG but not a JPEG, whose image is
    written all the same; a dpi above JPEG's 16-bit density likewise; metadata Pillow cannot write
    at all never costs the image."""
    from pipeline.images import Metadata, decode, encode

    exif = Image.Exif()
    exif[0x010E] = "x" * 70_000  # an ImageDescription too long for JPEG
    metadata = Metadata(exif=exif.tobytes(), dpi=(70_000.0, 70_000.0))
    pixels = photo(8, 8)
    with Image.open(io.BytesIO(encode(pixels, "PNG", metadata=metadata))) as png:
        assert png.getexif()[0x010E] == "x" * 70_000 and png.info["dpi"] == pytest.approx((70_000, 70_000), rel=1e-4)
    jpeg = encode(pixels, "JPEG", metadata=metadata)
    with Image.open(io.BytesIO(jpeg)) as out:
        assert 0x010E not in out.getexif() and out.info.get("dpi") in (None, (1, 1))
    assert decode(jpeg).pixels.shape == (8, 8, 3)
    unwritable = Metadata(exif=b"not EXIF", xmp=b"\xff\xfe", text=(("\u20ac", "a PNG keyword is Latin-1"),))
    for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "BMP"):
        assert decode(encode(pixels, fmt, metadata=unwritable)).pixels.shape == (8, 8, 3), fmt


@pytest.mark.cluster
def test_format_option_and_single_file(ray_local: None, inputs: Path, tmp_path: Path, tiny_checkpoint: str) -> None:
    dst = tmp_path / "dst"
    args = ["--checkpoint", tiny_checkpoint, "--format", "webp"]
    assert main(["upscale", str(inputs / "rgb.png"), str(dst), *args]) == EXIT_OK
    with Image.open(dst / "rgb.webp") as out:
        assert out.format == "WEBP" and out.size == (360, 280)
    assert not (dst / "rgb.png").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["upscale", "{tmp}/nonexistent", "{tmp}/out"], "does not exist"),
        (["upscale", "{tmp}/src", "{tmp}/out", "--halo", "32"], "halo must be between 0 and 31"),
        (["upscale", "{tmp}/src", "{tmp}/out", "--batch-size", "0"], "must be at least 1"),
        (["upscale", "{tmp}/src", "{tmp}/out", "--spot-check-rate", "2"], "must be between 0 and 1"),
        (["upscale", "{tmp}/src", "{tmp}/out", "--skip-detail", "-1"], "must be 0 or more"),
        (["upscale", "{tmp}/src", "{tmp}/out", "--checkpoint-sha256", "abc"], "must be 64 hexadecimal digits"),
        (
            ["upscale", "{tmp}/src", "{tmp}/out", "--checkpoint-sha256", "0" * 64],
            "but --checkpoint-sha256 asks for 0000",
        ),
        (["upscale", "{tmp}/src", "{tmp}/out", "--format", "xcf"], "'xcf' is not one of png"),
        (["upscale", "{tmp}/src", "{tmp}/src/"], "same place"),
        (["upscale", "{tmp}/src", "{tmp}/src/../src"], "same place"),
        (["upscale", "{tmp}/src", "{tmp}/caf\udce9"], "/caf\\xe9 is not valid UTF-8"),
        (["upscale", "{tmp}/src", "{tmp}/out", "--checkpoint", "{tmp}/nonexistent.safetensors"], "no such file"),
        (["frobnicate"], "invalid choice"),
    ],
    ids=[
        "missing-src",
        "halo",
        "batch-size",
        "spot-check-rate",
        "skip-detail",
        "sha256-not-hex",
        "sha256-mismatch",
        "format",
        "src-is-dst",
        "src-is-dst-spelled-differently",
        "dst-not-utf8",
        "missing-checkpoint",
        "command",
    ],
)
def test_usage_errors_exit_2_with_a_message(
    args: list[str], message: str, tmp_path: Path, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(40, 40)).save(src / "x.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if argv[0] == "upscale" and "--checkpoint" not in argv:
        argv += ["--checkpoint", tiny_checkpoint]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        status = e.code
    assert status == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()  # refused before any work
    assert sorted(p.name for p in src.iterdir()) == ["x.png"]


def test_info_reports_the_full_models_parameter_count() -> None:
    script = Path(sys.executable).with_name("isosr")  # the installed console script
    assert script.exists(), f"{script} is missing: install the package (pip install -e .)"
    run = subprocess.run(
        [str(script), "info", "--variant", "full"], capture_output=True, text=True, check=True, timeout=120
    )
    millions = float(re.search(r"parameters [\d,]+ \(([\d.]+) M\)", run.stdout).group(1))
    assert abs(millions - 23.8) / 23.8 <= 0.01
    assert "variant full" in run.stdout
    assert "untrained 'full' network (as asked" in run.stdout


def test_info_describes_the_shipped_default_weights() -> None:
    from model.checkpoint import DEFAULT_CHECKPOINT

    script = Path(sys.executable).with_name("isosr")
    out = subprocess.run([str(script), "info"], capture_output=True, text=True, check=True, timeout=120).stdout
    assert "variant small" in out
    assert "default weights ('small' variant, default.safetensors)" in out
    assert re.search(rf"version\s+{hashlib.sha256(DEFAULT_CHECKPOINT.read_bytes()).hexdigest()}$", out, re.MULTILINE)


def test_info_names_the_checkpoint_digest(tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--checkpoint", tiny_checkpoint]) == EXIT_OK
    out = capsys.readouterr().out
    assert re.search(rf"version\s+{hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()}$", out, re.MULTILINE)
    assert "variant tiny" in out


@pytest.mark.slow
@pytest.mark.cluster
def test_demo_upscales_the_sample_photos(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_checkpoint: str
) -> None:
    status = main(["demo", "--out", str(tmp_path / "demo"), "--checkpoint", tiny_checkpoint])
    assert status == EXIT_OK
    inputs, outputs = tmp_path / "demo" / "input", tmp_path / "demo" / "output"
    names = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png"]
    assert sorted(p.name for p in outputs.iterdir() if p.is_file()) == names
    for name in names:
        with Image.open(inputs / name) as before, Image.open(outputs / name) as after:
            assert after.size == (4 * before.width, 4 * before.height) and after.mode == before.mode, name
    with Image.open(outputs / "coffee.png") as out:
        assert out.size == (2400, 1600)
    out = capsys.readouterr().out
    assert "inputs 4, ok 4, failed 0, skipped 0" in out
    assert f"x4 outputs in {outputs.resolve()}" in out


@pytest.mark.slow
@pytest.mark.cluster
def test_demo_with_shards_writes_a_tar_shard_and_upscales_it(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_checkpoint: str
) -> None:
    """README's shard example: the photos as a WebDataset shard, upscaled into one of the same kind."""
    import tarfile

    status = main(["demo", "--out", str(tmp_path / "demo"), "--shards", "webdataset", "--checkpoint", tiny_checkpoint])
    assert status == EXIT_OK
    out = tmp_path / "demo" / "webdataset" / "output" / "photos.tar"
    with tarfile.open(out) as tar:
        entries = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(entries) == sorted(f"{n}.{e}" for n in ("astronaut", "camera", "chelsea", "coffee")
                                     for e in ("png", "txt", "isosr.json"))  # fmt: skip
    with Image.open(io.BytesIO(entries["coffee.png"])) as coffee:
        assert coffee.size == (2400, 1600)
    assert entries["coffee.txt"] == b"scikit-image sample photo 'coffee'"
    assert "inputs 4, ok 4, failed 0, skipped 0" in capsys.readouterr().out


def test_encode_never_writes_alpha_into_jpeg() -> None:
    from pipeline.images import decode, encode

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    data = encode(rgba, "JPEG")
    assert decode(data).pixels.shape == (8, 8, 3)
    assert Image.open(io.BytesIO(data)).format == "JPEG"


@pytest.mark.cluster
def test_gpu_actors_on_a_local_ray_without_gpus_exit_2_instead_of_waiting(tmp_path: Path, tiny_checkpoint: str) -> None:
    """`--gpus-per-worker 1` where isosr starts its own Ray and torch sees no GPU: that Ray cannot add
    one, so the actors would wait for ever (Ray Data gives up after 30 min). In a subprocess, so that
    it starts its own Ray rather than reusing the session's `ray_local`, which has a logical GPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so the run would start")
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(40, 50)).save(src / "a.png")
    argv = ["upscale", str(src), str(tmp_path / "out"), "--checkpoint", tiny_checkpoint]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv, "--gpus-per-worker", "1", "--max-workers", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == EXIT_USAGE, done.stderr[-3000:]
    assert "leave out --gpus-per-worker to run on the CPUs" in done.stderr, done.stderr[-3000:]
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.cluster
def test_a_pinned_checkpoint_runs_when_its_digest_matches(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(40, 40)).save(src / "x.png")
    digest = hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest().upper()  # any case
    argv = ["upscale", str(src), str(tmp_path / "out"), "--checkpoint", tiny_checkpoint, "--checkpoint-sha256", digest]
    assert main(argv) == EXIT_OK
    assert (tmp_path / "out" / "x.png").exists()


def test_a_model_worker_refuses_a_checkpoint_that_changed_after_the_driver_checked_it(tiny_checkpoint: str) -> None:
    """The actors read the checkpoint again: each checks the digest itself."""
    from model.checkpoint import CheckpointError
    from pipeline.stages import TileWorker

    with pytest.raises(CheckpointError, match="asks for 1111"):
        TileWorker(checkpoint=tiny_checkpoint, checkpoint_sha256="1" * 64, device="cpu", precision="float32",
                   batch_size=None, halo=4, threads=1)  # fmt: skip
