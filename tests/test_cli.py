"""`isosr upscale`, `isosr info` and `isosr demo` as a user runs them on local folders."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from model.checkpoint import save_checkpoint
from model.config import variant
from model.network import DenseIsoViT
from pipeline.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = DenseIsoViT(variant("tiny"))
    torch.nn.init.normal_(model.to_rgb.weight, std=0.02)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model, path)
    return str(path)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    import skimage.data

    rng = np.random.default_rng(seed)
    astronaut = skimage.data.astronaut()
    y, x = rng.integers(0, 512 - h), rng.integers(0, 512 - w)
    return astronaut[y : y + h, x : x + w]


@pytest.fixture
def inputs(tmp_path):
    """A nested folder of real-photo crops in the layouts and formats users have."""
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    rgb = photo(70, 90)
    Image.fromarray(rgb).save(src / "rgb.png")
    Image.fromarray(rgb).save(src / "nested" / "photo.jpg", quality=90)
    Image.fromarray(rgb[..., 1]).save(src / "nested" / "grey.png")
    rgba = np.dstack([rgb, np.linspace(0, 255, 70 * 90).reshape(70, 90).astype(np.uint8)])
    Image.fromarray(rgba).save(src / "nested" / "deeper" / "alpha.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(src / "grey16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "anim.gif")
    return src


EXPECTED = {  # input -> (output, mode)
    "rgb.png": ("rgb.png", "RGB"),
    "nested/photo.jpg": ("nested/photo.jpg", "RGB"),
    "nested/grey.png": ("nested/grey.png", "L"),
    "nested/deeper/alpha.png": ("nested/deeper/alpha.png", "RGBA"),
    "grey16.png": ("grey16.png", "I;16"),
    "anim.gif": ("anim.png", "RGB"),
}


def test_upscale_mirrors_paths_sizes_modes_and_formats(inputs, tmp_path, tiny_checkpoint, capsys):
    dst = tmp_path / "dst"
    status = main(["upscale", str(inputs), str(dst), "--checkpoint", tiny_checkpoint, "--batch-size", "5"])
    assert status == EXIT_OK
    for source, (output, mode) in EXPECTED.items():
        with Image.open(inputs / source) as before, Image.open(dst / output) as after:
            assert after.size == (4 * before.width, 4 * before.height), output
            assert after.mode == mode, output
            assert after.format == Image.open(inputs / source).format.replace("GIF", "PNG"), output
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert written == sorted(o for o, _ in EXPECTED.values())  # nothing else, no temporary files
    grey16 = np.asarray(Image.open(dst / "grey16.png"))
    assert grey16.dtype.itemsize == 2 and grey16.max() > 255  # 16-bit stays 16-bit
    out = capsys.readouterr()
    assert "inputs 6, ok 6, failed 0" in out.out
    assert "[6/6]" in out.err  # progress, one line per image


def test_bad_files_are_listed_and_the_rest_still_written(inputs, tmp_path, tiny_checkpoint, capsys):
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "notes.png").write_text("this is not an image")
    good = (inputs / "rgb.png").read_bytes()
    (inputs / "truncated.png").write_bytes(good[: len(good) // 2])
    dst = tmp_path / "dst"
    status = main(["upscale", str(inputs), str(dst), "--checkpoint", tiny_checkpoint])
    assert status == EXIT_SOME_FAILED
    out = capsys.readouterr().out
    assert "inputs 9, ok 6, failed 3" in out
    assert re.search(r"FAILED .*empty\.png: .*empty file", out)
    assert re.search(r"FAILED .*notes\.png: .*not a readable image", out)
    assert re.search(r"FAILED .*truncated\.png: .*not a readable image", out)
    for output, _ in EXPECTED.values():
        assert (dst / output).is_file()
    assert not (dst / "empty.png").exists() and not (dst / "notes.png").exists()


def test_exif_orientation_is_applied_and_icc_profile_kept(tmp_path, tiny_checkpoint):
    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(photo(40, 100)).save(src / "phone.jpg", exif=exif.tobytes(), icc_profile=icc)
    assert main(["upscale", str(src), str(tmp_path / "dst"), "--checkpoint", tiny_checkpoint]) == EXIT_OK
    with Image.open(tmp_path / "dst" / "phone.jpg") as out:
        assert out.size == (4 * 40, 4 * 100)  # displayed orientation: 40 wide, 100 tall
        assert out.info.get("icc_profile") == icc


def test_format_option_and_single_file(inputs, tmp_path, tiny_checkpoint):
    dst = tmp_path / "dst"
    assert main(["upscale", str(inputs / "rgb.png"), str(dst), "--checkpoint", tiny_checkpoint, "--format", "webp"]) == 0
    with Image.open(dst / "rgb.webp") as out:
        assert out.format == "WEBP" and out.size == (360, 280)


@pytest.mark.parametrize(
    "args,message",
    [
        (["upscale", "/nonexistent/in", "/tmp/out"], "does not exist"),
        (["upscale", ".", "/tmp/out", "--halo", "32"], "halo must be between 0 and 31"),
        (["upscale", ".", "/tmp/out", "--batch-size", "0"], "must be at least 1"),
        (["upscale", ".", "/tmp/out", "--checkpoint", "/nonexistent.safetensors"], "no such file"),
        (["upscale", ".", "/tmp/out", "--format", "xcf"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_a_message(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    try:
        status = main(args)
    except SystemExit as e:  # argparse's own usage errors
        status = e.code
    assert status == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_info_reports_the_full_models_parameter_count():
    out = subprocess.run(
        [shutil.which("isosr") or sys.executable, "info"] if shutil.which("isosr") else [sys.executable, "-m", "pipeline.cli", "info"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    millions = float(re.search(r"parameters [\d,]+ \(([\d.]+) M\)", out).group(1))
    assert abs(millions - 23.8) / 23.8 <= 0.01
    assert "variant full" in out


def test_info_names_the_checkpoint_digest(tiny_checkpoint, capsys):
    import hashlib
    from pathlib import Path

    assert main(["info", "--checkpoint", tiny_checkpoint]) == EXIT_OK
    out = capsys.readouterr().out
    assert hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest() in out
    assert "variant tiny" in out


@pytest.mark.slow
def test_demo_upscales_the_sample_photos(tmp_path, capsys, tiny_checkpoint):
    status = main(["demo", "--out", str(tmp_path / "demo"), "--checkpoint", tiny_checkpoint])
    assert status == EXIT_OK
    outputs = sorted(p.name for p in (tmp_path / "demo" / "output").iterdir())
    assert outputs == ["astronaut.png", "camera.png", "chelsea.png", "coffee.png"]
    with Image.open(tmp_path / "demo" / "output" / "coffee.png") as out:
        assert out.size == (2400, 1600)
    assert f"x4 outputs in {(tmp_path / 'demo' / 'output').resolve()}" in capsys.readouterr().out


def test_encode_never_writes_alpha_into_jpeg():
    from pipeline.images import decode, encode

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    data = encode(rgba, "JPEG")
    assert decode(data).pixels.shape == (8, 8, 3)
    assert Image.open(io.BytesIO(data)).format == "JPEG"
