"""End-to-end tests of the distributed pipeline (pipeline.run) on a local Ray with logical GPUs, on
local folders and on a real S3 endpoint (moto's server on 127.0.0.1).

What a user would notice: an output missing, misplaced, of the wrong size, mode or format, or not
looking like its input; an input with no manifest row, or two; a bad file that stops the job or
leaves no readable reason; an object written outside DST; a second run that redoes work; a large
image that comes out different when it is cut into bands; a barrier in the streaming pipeline;
spot checks that sample differently from run to run. The tiny model variant keeps each run to
seconds; one Ray session (conftest's `ray_local`) serves the whole module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
import tifffile
from PIL import Image, ImageOps, ImageSequence

from pipeline.cli import EXIT_OK, EXIT_SOME_FAILED, main
from pipeline.run import DECODE_TASKS_PER_ACTOR, LAST_ROUND_BANDS, RunOptions, RunResult, run
from pipeline.stages import MODEL_ENV, RT_SCORES

pytestmark = pytest.mark.cluster

RUNS = "_isosr/runs"

# An upscale of a photo, box-downscaled x4, against the input: a faithful x4 scores ~30-40 dB, the
# wrong picture, orientation or channel order scores ~10-18 dB.
MIN_LOOKALIKE_PSNR_DB = 25.0


# ----------------------------------------------------------------------------- fixtures and helpers


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def photo(name: str, h: int, w: int, y: int = 0, x: int = 0) -> np.ndarray:
    """An h x w crop of one of scikit-image's bundled photos (no download)."""
    pixels = getattr(skimage.data, name)()
    crop = pixels[y : y + h, x : x + w]
    assert crop.shape[:2] == (h, w), (name, crop.shape)
    return np.ascontiguousarray(crop)


def encoded(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


class Store:
    """SRC and DST on one store, local folder or S3 bucket: put inputs, read what the run wrote."""

    def __init__(
        self, *, root: Path | None = None, bucket: str | None = None, client: object = None, endpoint: str = ""
    ) -> None:
        self.root, self.bucket, self.client, self.endpoint = root, bucket, client, endpoint

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}" if self.bucket else str(self.root / key)

    def put(self, key: str, data: bytes) -> None:
        if self.bucket:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        else:
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def get(self, key: str) -> bytes:
        if self.bucket:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return (self.root / key).read_bytes()

    def keys(self) -> list[str]:
        """Every object (S3) or file (local) in the store, as keys."""
        if self.bucket:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def read_table(self, key: str) -> pa.Table:
        """A Parquet file read independently of the code under test: pyarrow, through s3fs on S3."""
        if not self.bucket:
            return pq.read_table(self.root / key)
        import s3fs

        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": self.endpoint})
        with fs.open(f"{self.bucket}/{key}", "rb") as f:
            return pq.read_table(f)

    def run_dirs(self, dst: str) -> list[str]:
        """Keys of DST's run folders (DST/_isosr/runs/<run_id>), one per run that wrote its manifest."""
        manifests = [k for k in self.keys() if k.startswith(f"{dst}/{RUNS}/") and k.endswith("/manifest.parquet")]
        return sorted(k.rsplit("/", 1)[0] for k in manifests)


def new_bucket(client: object, name: str) -> str:
    bucket = f"isosr-{name}-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="module")
def s3_client(s3_env: str) -> object:
    import boto3

    return boto3.client(
        "s3", endpoint_url=s3_env, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def local_store(tmp_path_factory: pytest.TempPathFactory, name: str) -> Store:
    return Store(root=tmp_path_factory.mktemp(name))


def s3_store(client: object, endpoint: str, name: str) -> Store:
    return Store(bucket=new_bucket(client, name), client=client, endpoint=endpoint)


def run_key(store: Store, result: RunResult, dst: str) -> str:
    """The run folder's key in `store`, checked against where the result says it is."""
    key = f"{dst}/{RUNS}/{result.run_id}"
    assert result.run_dir.rstrip("/") == store.uri(key)
    return key


# ----------------------------------------------------------------------------- comparing pictures


def comparable(img: Image.Image) -> np.ndarray:
    """HxWxC float64 on the 8-bit scale: 16-bit scaled down, palette/CMYK as RGB, alpha
    premultiplied (the colour under transparent pixels is not part of the picture)."""
    if img.mode in ("I;16", "I;16B", "I"):
        return (np.asarray(img, dtype=np.float64) / 257)[..., None]
    if img.mode in ("P", "CMYK"):
        img = img.convert("RGB")
    x = np.asarray(img, dtype=np.float64)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[2] in (2, 4):
        x = np.concatenate([x[..., :-1] * x[..., -1:] / 255, x[..., -1:]], axis=2)
    return x


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def lookalike_psnr(before: Image.Image, after: Image.Image) -> float:
    """PSNR of the x4 output box-downscaled x4 against the (EXIF-rotated) input, 4 px border cropped."""
    ref, out = comparable(before), comparable(after)
    h, w, c = ref.shape
    assert out.shape == (4 * h, 4 * w, c), (out.shape, ref.shape)
    down = out.reshape(h, 4, w, 4, c).mean(axis=(1, 3))
    return psnr(down[4:-4, 4:-4], ref[4:-4, 4:-4])


# ----------------------------------------------------------------------------- a mixed dataset


@dataclass(frozen=True)
class Expected:
    output: str  # key relative to DST
    mode: str  # Pillow mode of the output
    format: str  # Pillow format of the output


def mixed_tree() -> dict[str, tuple[bytes, Expected]]:
    """key -> (input bytes, expected output): every layout and format users have, in a nested tree
    with spaces and unicode in its names. Every side >= 64 px, so any image can be spot-checked."""
    rgb = photo("astronaut", 72, 88, 180, 200)  # the face
    coffee = photo("coffee", 80, 96, 100, 200)
    grey = photo("camera", 76, 84, 100, 200)
    alpha = np.linspace(0, 255, rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[:2]).astype(np.uint8)
    grey16 = grey.astype(np.uint16) * 257 + np.arange(grey.shape[1], dtype=np.uint16)  # uses all 16 bits
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 wide x 96 tall, shown rotated 90 degrees clockwise: 96 wide x 64 tall
    phone = photo("astronaut", 96, 64, 40, 200)
    return {
        "photos/astronaut face.png": (
            encoded(Image.fromarray(rgb), "PNG"),
            Expected("photos/astronaut face.png", "RGB", "PNG"),
        ),
        "photos/ñandú/coffee cup.jpg": (
            encoded(Image.fromarray(coffee), "JPEG", quality=92),
            Expected("photos/ñandú/coffee cup.jpg", "RGB", "JPEG"),
        ),
        "grey/cámera 1.png": (encoded(Image.fromarray(grey), "PNG"), Expected("grey/cámera 1.png", "L", "PNG")),
        "alpha/mask 中文.png": (
            encoded(Image.fromarray(np.dstack([rgb, alpha])), "PNG"),
            Expected("alpha/mask 中文.png", "RGBA", "PNG"),
        ),
        "deep/16 bit/grey16.png": (
            encoded(Image.fromarray(grey16), "PNG"),
            Expected("deep/16 bit/grey16.png", "I;16", "PNG"),
        ),
        "anim/palette.gif": (
            encoded(Image.fromarray(coffee).convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
            Expected("anim/palette.png", "RGB", "PNG"),
        ),
        "web/coffee.webp": (
            encoded(Image.fromarray(coffee), "WEBP", quality=95),
            Expected("web/coffee.webp", "RGB", "WEBP"),
        ),
        "scan/astronaut.tiff": (encoded(Image.fromarray(rgb), "TIFF"), Expected("scan/astronaut.tiff", "RGB", "TIFF")),
        "scan/old scan.bmp": (encoded(Image.fromarray(coffee), "BMP"), Expected("scan/old scan.bmp", "RGB", "BMP")),
        "print/cmyk.jpg": (
            encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
            Expected("print/cmyk.jpg", "RGB", "JPEG"),
        ),
        "phone/IMG 0001.JPG": (
            encoded(Image.fromarray(phone), "JPEG", quality=95, exif=exif.tobytes()),
            Expected("phone/IMG 0001.JPG", "RGB", "JPEG"),
        ),
        "phone/IMG 0002.HEIC": (  # stored on its side, libheif's rotation box turns it
            encoded(Image.fromarray(phone), "HEIF", quality=95, exif=exif.tobytes()),
            Expected("phone/IMG 0002.jpg", "RGB", "JPEG"),
        ),
        "web/coffee.avif": (
            encoded(Image.fromarray(coffee), "AVIF", quality=95),
            Expected("web/coffee.avif", "RGB", "AVIF"),
        ),
        "scan/archive.jp2": (encoded(Image.fromarray(grey), "JPEG2000"), Expected("scan/archive.jp2", "L", "JPEG2000")),
        "scan/page 7.pgm": (encoded(Image.fromarray(grey), "PPM"), Expected("scan/page 7.png", "L", "PNG")),
        "textures/decal.tga": (
            encoded(Image.fromarray(np.dstack([rgb, alpha])), "TGA", compression="tga_rle"),
            Expected("textures/decal.png", "RGBA", "PNG"),
        ),
    }


@dataclass
class MixedRun:
    store: Store
    src: str  # keys' prefix in the store
    dst: str
    tree: dict[str, tuple[bytes, Expected]]
    result: RunResult
    seconds: float


MIXED_RATE = 0.3


def run_mixed(store: Store, tiny_checkpoint: str) -> MixedRun:
    tree = mixed_tree()
    for key, (data, _) in tree.items():
        store.put(f"in put/{key}", data)
    options = RunOptions(
        src=store.uri("in put"),
        dst=store.uri("out"),
        checkpoint=tiny_checkpoint,
        gpus_per_worker=1,
        spot_check_rate=MIXED_RATE,
    )
    started = time.perf_counter()
    result = run(options)
    return MixedRun(store, "in put", "out", tree, result, time.perf_counter() - started)


@pytest.fixture(scope="module")
def mixed_local(ray_local: None, tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str) -> MixedRun:
    return run_mixed(local_store(tmp_path_factory, "mixed"), tiny_checkpoint)


@pytest.fixture(scope="module")
def mixed_s3(ray_local: None, s3_client: object, s3_env: str, tiny_checkpoint: str) -> MixedRun:
    return run_mixed(s3_store(s3_client, s3_env, "mixed"), tiny_checkpoint)


@pytest.fixture(params=["local", "s3"])
def mixed(request: pytest.FixtureRequest) -> MixedRun:
    return request.getfixturevalue(f"mixed_{request.param}")


# ----------------------------------------------------------------------------- 1. formats, modes, sizes, manifest


def test_every_output_mirrors_its_input(mixed: MixedRun) -> None:
    store, tree = mixed.store, mixed.tree
    for key, (data, expected) in tree.items():
        with Image.open(io.BytesIO(data)) as raw:
            before = ImageOps.exif_transpose(raw)
            before.load()
        with Image.open(io.BytesIO(store.get(f"{mixed.dst}/{expected.output}"))) as after:
            after.load()
            assert after.format == expected.format, key
            assert after.size == (4 * before.width, 4 * before.height), key
            assert after.mode == expected.mode, key
            # Shown upright once: no orientation tag left to rotate it a second time.
            assert after.getexif().get(0x0112, 1) == 1, key
            score = lookalike_psnr(before, after)
            assert score >= MIN_LOOKALIKE_PSNR_DB, f"{key}: the output, downscaled, is {score:.1f} dB from the input"
    grey16 = np.asarray(Image.open(io.BytesIO(store.get(f"{mixed.dst}/deep/16 bit/grey16.png"))))
    assert grey16.dtype.itemsize == 2 and np.count_nonzero(grey16 % 257) > grey16.size // 2  # not 8-bit widened

    # Nothing else lands in DST: no temporaries, no output for a non-input; records only under _isosr/.
    written = [k[len(mixed.dst) + 1 :] for k in store.keys() if k.startswith(mixed.dst + "/")]  # noqa: SIM118 - Store is not a mapping
    outputs = sorted(k for k in written if not k.startswith("_isosr/"))
    assert outputs == sorted(e.output for _, e in tree.values())


def test_the_exif_rotation_is_clockwise(mixed_local: MixedRun) -> None:
    data, expected = mixed_local.tree["phone/IMG 0001.JPG"]
    output = mixed_local.store.get(f"{mixed_local.dst}/{expected.output}")
    with Image.open(io.BytesIO(data)) as stored, Image.open(io.BytesIO(output)) as after:
        after.load()
        right = lookalike_psnr(stored.rotate(-90, expand=True), after)
        wrong = lookalike_psnr(stored.rotate(90, expand=True), after)
    assert right >= MIN_LOOKALIKE_PSNR_DB and right - wrong >= 5, (right, wrong)


def test_manifest_has_one_ok_row_per_input_and_the_model_version(mixed: MixedRun, tiny_checkpoint: str) -> None:
    store, tree = mixed.store, mixed.tree
    runs = store.run_dirs(mixed.dst)
    assert runs == [run_key(store, mixed.result, mixed.dst)]
    manifest = store.read_table(f"{runs[0]}/manifest.parquet")
    rows = manifest.to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(tree)  # each input exactly once
    for row in rows:
        _, expected = tree[row["key"]]
        assert row["status"] == "ok" and row["error"] is None, row
        assert row["run_id"] == mixed.result.run_id
        assert row["source"] == store.uri(f"{mixed.src}/{row['key']}")
        assert row["output"] == store.uri(f"{mixed.dst}/{expected.output}")
        assert row["size_bytes"] == len(tree[row["key"]][0])
        assert row["source_version"]
        assert (row["out_width"], row["out_height"]) == (4 * row["width"], 4 * row["height"])
        assert row["out_bytes"] == len(store.get(f"{mixed.dst}/{expected.output}"))
        assert row["model_sha256"] == sha256_of(tiny_checkpoint)
        assert row["consistency_psnr"] is not None and row["consistency_psnr"] > 30, row
    # The input's layout after decoding; palette and CMYK are decoded to RGB.
    assert {r["key"]: r["mode"] for r in rows} == {k: e.mode for k, (_, e) in tree.items()}

    checked = [r for r in rows if r["spot_check"]]
    assert checked, "no image was spot-checked"
    for row in checked:
        scores = [row[c] for c in RT_SCORES]
        assert all(s is not None and math.isfinite(s) for s in scores), row
        assert row["rt_gain_db"] == pytest.approx(row["rt_psnr_model_y"] - row["rt_psnr_bicubic_y"], abs=1e-9)
        assert 15 < row["rt_psnr_model_y"] < 60 and 15 < row["rt_psnr_bicubic_y"] < 60, row

    for name in ("report.json", "report.html"):
        assert store.get(f"{runs[0]}/{name}"), name
    report = json.loads(store.get(f"{runs[0]}/report.json"))
    assert report["counts"] == {"inputs": len(tree), "ok": len(tree), "failed": 0, "skipped": 0}
    assert report["model_sha256"] == [sha256_of(tiny_checkpoint)]


# ----------------------------------------------------------------------------- 2. bad inputs


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny (wrong) data chunk: a pixel bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_inputs_are_reported_and_never_stop_the_job(
    ray_local: None,
    s3_client: object,
    s3_env: str,
    tiny_checkpoint: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = s3_store(s3_client, s3_env, "bad")
    good_png = encoded(Image.fromarray(photo("astronaut", 64, 72, 180, 200)), "PNG")
    good_jpg = encoded(Image.fromarray(photo("coffee", 64, 80, 100, 200)), "JPEG", quality=90)
    good = {"good/face.png": good_png, "good/coffee.jpg": good_jpg}
    bad = {  # key -> (bytes, what the error must say)
        "bad/empty.png": (b"", r"empty file"),
        "bad/truncated.png": (good_png[: len(good_png) // 2], r"truncat|not a readable image"),
        "bad/truncated.jpg": (good_jpg[: len(good_jpg) // 2], r"truncat|not a readable image"),
        "bad/notes.png": (b"meeting notes, not a picture\n" * 20, r"not an image"),
        "bad/big.png": (encoded(Image.fromarray(photo("camera", 100, 120)), "PNG"), r"12000 pixels is above the limit"),
        "bad/header bomb.png": (header_only_png(30000, 30000), r"900000000 pixels"),
        "bad/float.tif": (
            encoded(Image.fromarray(np.full((70, 70), 0.5, np.float32)), "TIFF"),
            r"32-bit floating-point pixels .*convert",
        ),
        "bad/deleted.png": (good_png, r"no such file"),
    }
    for key, data in {**good, **{k: v for k, (v, _) in bad.items()}}.items():
        store.put(f"src/{key}", data)

    # An object that is listed, then gone before it is read (deleted, or unreadable by then).
    import pipeline.run

    plan = pipeline.run.plan_inputs

    def plan_then_delete(*args: object, **kwargs: object) -> object:
        planned = plan(*args, **kwargs)
        s3_client.delete_object(Bucket=store.bucket, Key="src/bad/deleted.png")
        return planned

    monkeypatch.setattr(pipeline.run, "plan_inputs", plan_then_delete)
    args = ["--checkpoint", tiny_checkpoint, "--max-pixels", "10000", "--gpus-per-worker", "1"]
    status = main(["upscale", store.uri("src"), store.uri("dst"), *args])
    out = capsys.readouterr().out

    assert status == EXIT_SOME_FAILED
    assert f"inputs {len(good) + len(bad)}, ok {len(good)}, failed {len(bad)}, skipped 0" in out
    for key, data in good.items():
        with Image.open(io.BytesIO(data)) as before, Image.open(io.BytesIO(store.get(f"dst/{key}"))) as after:
            assert after.size == (4 * before.width, 4 * before.height), key
    outputs = [k for k in store.keys() if k.startswith("dst/") and not k.startswith("dst/_isosr/")]  # noqa: SIM118
    assert sorted(outputs) == sorted(f"dst/{k}" for k in good)

    [run_dir] = store.run_dirs("dst")
    rows = {r["key"]: r for r in store.read_table(f"{run_dir}/manifest.parquet").to_pylist()}
    assert sorted(rows) == sorted([*good, *bad])
    for key, (_, message) in bad.items():
        row = rows[key]
        assert row["status"] == "failed" and row["output"] is None, row
        assert re.search(message, row["error"]), f"{key}: {row['error']!r} does not say {message!r}"
        assert re.search(rf"FAILED {re.escape(key)}: .*({message})", out), f"{key} is not listed as failed"
    assert all(rows[k]["status"] == "ok" for k in good)


# ----------------------------------------------------------------------------- 3. keys with '..'


def test_keys_with_dot_dot_segments_stay_inside_dst(
    ray_local: None, s3_client: object, s3_env: str, tiny_checkpoint: str
) -> None:
    store = s3_store(s3_client, s3_env, "dots")
    png = encoded(Image.fromarray(photo("astronaut", 64, 64, 180, 200)), "PNG")
    inputs = ["src/a/../../escape.png", "src/../../up.png", "src/b/../c.png", "src/plain.png"]
    for key in inputs:
        store.put(key, png)

    result = run(RunOptions(src=store.uri("src"), dst=store.uri("dst"), checkpoint=tiny_checkpoint, gpus_per_worker=1))

    rows = result.manifest.to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(k[len("src/") :] for k in inputs)
    assert all(r["status"] == "ok" for r in rows), rows
    everything = store.keys()
    stray = [k for k in everything if k not in inputs and not k.startswith("dst/")]
    assert stray == [], f"written outside DST: {stray}"
    for row in rows:
        assert row["output"].startswith(store.uri("dst/"))
        key = row["output"][len(store.uri("")) :]
        assert key in everything and ".." not in key.split("/"), key
        with Image.open(io.BytesIO(store.get(key))) as img:
            assert img.size == (256, 256)
    outputs = [k for k in everything if k.startswith("dst/") and not k.startswith("dst/_isosr/")]
    assert len(outputs) == len(inputs)  # one output each: no two keys collapsed onto one


def test_two_inputs_never_share_one_output(ray_local: None, tmp_path: Path, tiny_checkpoint: str) -> None:
    store = Store(root=tmp_path)
    inputs = {
        "photo.jpg": Image.fromarray(photo("astronaut", 64, 72, 180, 200)),
        "photo.jpeg": Image.fromarray(photo("coffee", 64, 72, 100, 200)),
    }
    for key, img in inputs.items():
        store.put(f"src/{key}", encoded(img, "JPEG", quality=95))

    result = run(RunOptions(src=store.uri("src"), dst=store.uri("dst"), checkpoint=tiny_checkpoint, gpus_per_worker=1))

    rows = result.manifest.to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(inputs)
    ok = [r for r in rows if r["status"] == "ok"]
    shared = [(r["key"], r["output"]) for r in ok]
    assert len({r["output"] for r in ok}) == len(ok), f"two inputs written to one output: {shared}"
    for row in ok:  # each output is the upscale of its own input
        with Image.open(row["output"]) as after:
            after.load()
            assert lookalike_psnr(inputs[row["key"]], after) >= MIN_LOOKALIKE_PSNR_DB, row["key"]
    assert all(r["error"] for r in rows if r["status"] != "ok")


def test_flat_tiles_skip_the_network_and_the_manifest_counts_them(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str
) -> None:
    """A scan with a blank margin: its margin's tiles take the skip path (the margin comes out its
    exact colour); a photo's tiles all run the network."""
    store = Store(root=tmp_path)
    margin = np.full((200, 120, 3), 236, np.uint8)
    margin[140:, :] = photo("astronaut", 60, 120, 200, 150)
    store.put("src/scan.png", encoded(Image.fromarray(margin), "PNG"))
    store.put("src/photo.png", encoded(Image.fromarray(photo("coffee", 80, 80, 100, 200)), "PNG"))

    result = run(RunOptions(src=store.uri("src"), dst=store.uri("dst"), checkpoint=tiny_checkpoint, gpus_per_worker=1))

    rows = {r["key"]: r for r in result.manifest.to_pylist()}
    assert rows["scan.png"]["tiles_skipped"] >= 2, rows["scan.png"]
    assert rows["scan.png"]["tiles_skipped"] < rows["scan.png"]["tiles"]
    assert rows["photo.png"]["tiles_skipped"] == 0
    assert result.summary["tiles"]["skipped"] == rows["scan.png"]["tiles_skipped"]
    with Image.open(rows["scan.png"]["output"]) as out:
        top = np.asarray(out)[: 56 * 4]  # rows owned by the first row of tiles alone: all margin
    assert (top == 236).all()


def test_a_gpu_actors_calls_at_once_each_count_their_own_skipped_tiles(tmp_path: Path, tiny_checkpoint: str) -> None:
    """GPU actors run calls in threads at once (GPU_CALLS_PER_ACTOR): a scan with a blank margin and a
    photo, each called many times together, give the same outputs and the same skipped tiles as
    calls one at a time; the photo never takes the scan's skipped tiles."""
    import threading

    from pipeline.run import GPU_CALLS_PER_ACTOR
    from pipeline.stages import TileWorker, decode_stage

    assert GPU_CALLS_PER_ACTOR > 1
    margin = np.full((200, 120, 3), 236, np.uint8)
    margin[140:, :] = photo("astronaut", 60, 120, 200, 150)
    images = {"scan.png": margin, "photo.png": photo("coffee", 80, 80, 100, 200)}
    listing = []
    for key, pixels in images.items():
        (tmp_path / key).write_bytes(encoded(Image.fromarray(pixels), "PNG"))
        listing.append({"source": str(tmp_path / key), "key": key, "size_bytes": 0, "source_version": "v",
                        "output": "unused", "out_format": "PNG", "spot_check": False})  # fmt: skip
    rows = decode_stage(pa.Table.from_pylist(listing), tile=64, scale=4, halo=4, max_tiles=1024, max_pixels=None)
    rows = {r["key"]: rows.slice(i, 1) for i, r in enumerate(rows.to_pylist())}
    worker = TileWorker(checkpoint=tiny_checkpoint, device="cpu", precision="float32", batch_size=8, halo=4,
                        threads=1, skip_detail=0.5)  # fmt: skip
    alone = {key: worker(row).to_pylist()[0] for key, row in rows.items()}
    assert alone["scan.png"]["tiles_skipped"] >= 2 and alone["photo.png"]["tiles_skipped"] == 0

    calls = [key for key in rows for _ in range(GPU_CALLS_PER_ACTOR)]
    start, together = threading.Barrier(len(calls)), [None] * len(calls)

    def call(i: int) -> None:
        start.wait()
        together[i] = worker(rows[calls[i]]).to_pylist()[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, got in zip(calls, together):
        assert got["tiles_skipped"] == alone[key]["tiles_skipped"], (key, got["tiles_skipped"])
        assert got["tiles"] == alone[key]["tiles"] and got["out_pixels"] == alone[key]["out_pixels"], key


# ----------------------------------------------------------------------------- 4 and 7. skip, overwrite, spot checks


def test_a_second_run_skips_everything_and_overwrite_redoes_it(
    mixed_local: MixedRun, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store, tree = mixed_local.store, mixed_local.tree
    src, dst = store.uri(mixed_local.src), store.uri(mixed_local.dst)
    outputs = [store.root / mixed_local.dst / e.output for _, e in tree.values()]
    first = mixed_local.result.manifest
    stamps = [p.stat().st_mtime_ns for p in outputs]
    capsys.readouterr()

    runs = set(store.run_dirs(mixed_local.dst))
    started = time.perf_counter()
    args = ["--checkpoint", tiny_checkpoint, "--spot-check-rate", str(MIXED_RATE)]
    assert main(["upscale", src, dst, *args]) == EXIT_OK
    seconds = time.perf_counter() - started
    [skip_run] = set(store.run_dirs(mixed_local.dst)) - runs
    assert f"inputs {len(tree)}, ok 0, failed 0, skipped {len(tree)}" in capsys.readouterr().out
    # No model work: quick, outputs untouched.
    assert seconds < min(10.0, mixed_local.seconds), (seconds, mixed_local.seconds)
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
    skipped = store.read_table(f"{skip_run}/manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in skipped) == sorted(tree)
    assert {r["status"] for r in skipped} == {"skipped"}
    assert all(r["output"] and r["error"] for r in skipped)

    runs = set(store.run_dirs(mixed_local.dst))
    assert main(["upscale", src, dst, *args, "--overwrite"]) == EXIT_OK
    assert f"inputs {len(tree)}, ok {len(tree)}, failed 0, skipped 0" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns > s for p, s in zip(outputs, stamps))
    [redo_run] = set(store.run_dirs(mixed_local.dst)) - runs
    redone = store.read_table(f"{redo_run}/manifest.parquet").sort_by("key")
    assert redone.column("status").to_pylist() == ["ok"] * len(tree)

    # Spot checks are deterministic: the same keys on both runs at the same rate, some but not all.
    sampled = first.sort_by("key").column("spot_check").to_pylist()
    assert redone.column("spot_check").to_pylist() == sampled
    assert 0 < sum(sampled) < len(tree)
    # The same model on the same input gives the same output.
    before = first.sort_by("key").column("consistency_psnr").to_pylist()
    assert redone.column("consistency_psnr").to_pylist() == pytest.approx(before, abs=1e-9)


# ----------------------------------------------------------------------------- 5. large images in bands


@dataclass
class TallRuns:
    store: Store
    split: RunResult
    whole: RunResult


@pytest.fixture(scope="module")
def tall(ray_local: None, tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str) -> TallRuns:
    """One tall photo (512 x 96: 9 x 2 tiles) upscaled in bands (max_tiles=4) and whole, at
    spot-check rate 0, beside a small photo so the sample has a choice. ("tall.png" hashes below
    "thumb.png", so the sample of one is the banded image.)"""
    store = local_store(tmp_path_factory, "tall")
    store.put("src/tall.png", encoded(Image.fromarray(photo("astronaut", 512, 96, 0, 200)), "PNG"))
    store.put("src/thumb.png", encoded(Image.fromarray(photo("coffee", 64, 64, 100, 200)), "PNG"))
    results = {}
    for name, max_tiles in (("split", 4), ("whole", 1024)):
        options = RunOptions(
            src=store.uri("src"),
            dst=store.uri(name),
            checkpoint=tiny_checkpoint,
            gpus_per_worker=1,
            spot_check_rate=0.0,
            max_tiles=max_tiles,
        )
        results[name] = run(options)
    return TallRuns(store, **results)


def test_a_large_image_cut_into_bands_comes_out_as_whole_running_each_tile_once(tall: TallRuns) -> None:
    from pipeline.stages import decode_stage

    # max_tiles=4 really does cut this image: decoding yields more than one piece of work.
    listing = pa.Table.from_pylist(
        [
            {
                "source": tall.store.uri("src/tall.png"),
                "key": "tall.png",
                "size_bytes": 0,
                "source_version": "v",
                "output": "unused",
                "out_format": "PNG",
                "spot_check": False,
            }
        ]
    )
    pieces = decode_stage(listing, tile=64, scale=4, halo=4, max_tiles=4, max_pixels=None)
    assert pieces.num_rows >= 2 and set(pieces.column("piece_count").to_pylist()) == {pieces.num_rows}

    # Identical but in the seam rows two bands share, which are the sum of two parts: there a value
    # may round to the next level.
    split = np.asarray(Image.open(tall.store.root / "split" / "tall.png")).astype(int)
    whole = np.asarray(Image.open(tall.store.root / "whole" / "tall.png")).astype(int)
    assert split.shape == whole.shape == (2048, 384, 3)
    seams = np.zeros(2048, bool)
    for band in pieces.column("band").to_pylist():
        own, reach = band[2:4], band[6:8]  # model.tiling.Band: owned rows, rows its tiles reach
        seams[reach[0] : own[0]] = seams[own[1] : reach[1]] = True
    assert seams.any() and not seams.all()
    diff = np.abs(split - whole)
    assert diff[seams].max() <= 1 and diff[~seams].max() == 0, np.flatnonzero(diff.any(axis=(1, 2)))

    rows = {name: r.manifest.to_pylist() for name, r in (("split", tall.split), ("whole", tall.whole))}
    assert [r["key"] for r in rows["split"]] == [r["key"] for r in rows["whole"]] == ["tall.png", "thumb.png"]
    split_row, whole_row = rows["split"][0], rows["whole"][0]
    assert split_row["status"] == "ok" and (split_row["out_width"], split_row["out_height"]) == (384, 2048)
    assert split_row["consistency_psnr"] == pytest.approx(whole_row["consistency_psnr"], abs=0.05)
    assert split_row["piece_count"] == pieces.num_rows and whole_row["piece_count"] == 1
    assert split_row["tiles"] == whole_row["tiles"] > 9 * 2  # no tile run twice (and its spot check's round trip)

    run_dir = tall.store.root / "split" / RUNS / tall.split.run_id
    assert [p for p in (run_dir / "staging").rglob("*") if p.is_file()] == []  # staged bands cleaned up


def test_a_lone_image_is_shared_by_every_cpu_actor(tall: TallRuns, tiny_checkpoint: str) -> None:
    """A run of fewer images than CPU model actors cuts each image, where it is tall enough, into a
    band per actor at least, instead of leaving actors waiting: here one image on two actors, in
    four bands (pipeline.run.LAST_ROUND_BANDS: the actors start apart). Its output is
    the whole image's (to 1/255: these actors run single-threaded, the whole run's with torch's
    threads)."""
    from pipeline.stages import decode_stage

    tall.store.put("alone/tall.png", (tall.store.root / "src" / "tall.png").read_bytes())
    result = run(RunOptions(src=tall.store.uri("alone"), dst=tall.store.uri("alone-out"), checkpoint=tiny_checkpoint,
                            gpus_per_worker=0, spot_check_rate=0.0))  # fmt: skip

    [row] = result.manifest.to_pylist()
    [whole_row] = [r for r in tall.whole.manifest.to_pylist() if r["key"] == "tall.png"]
    assert row["status"] == "ok"
    assert row["piece_count"] == LAST_ROUND_BANDS, "not cut"
    assert row["tiles"] == whole_row["tiles"]
    shared = np.asarray(Image.open(tall.store.root / "alone-out" / "tall.png")).astype(int)
    whole = np.asarray(Image.open(tall.store.root / "whole" / "tall.png")).astype(int)
    assert shared.shape == whole.shape and np.abs(shared - whole).max() <= 1

    # Decoding does the cutting: two pieces of the tall image (9 tile rows), one of the thumbnail
    # (one tile row), however many actors wait.
    def pieces(key: str, spread: int) -> int:
        listing = pa.Table.from_pylist([{"source": tall.store.uri(f"src/{key}"), "key": key, "size_bytes": 0,
                                         "source_version": "v", "output": "unused", "out_format": "PNG",
                                         "spot_check": False, "spread": spread}])  # fmt: skip
        return decode_stage(listing, tile=64, scale=4, halo=4, max_tiles=1024, max_pixels=None).num_rows

    assert [pieces("tall.png", n) for n in (1, 2)] == [1, 2]
    assert [pieces("thumb.png", n) for n in (1, 2, 8)] == [1, 1, 1]


def test_the_last_round_of_images_is_shared_by_every_cpu_actor(tall: TallRuns, tiny_checkpoint: str) -> None:
    """Three images on two CPU actors: the largest file goes whole to one actor; the other two, the
    last round, are cut into four bands each instead of running whole, one on each actor, while the
    actor that ends first waits for the other."""
    rng = np.random.default_rng(3)
    for name in ("noise-a.png", "noise-b.png"):  # incompressible: larger files than tall.png
        tall.store.put(f"three/{name}", encoded(Image.fromarray(rng.integers(0, 256, (512, 96, 3), np.uint8)), "PNG"))
    tall.store.put("three/tall.png", (tall.store.root / "src" / "tall.png").read_bytes())
    result = run(RunOptions(src=tall.store.uri("three"), dst=tall.store.uri("three-out"), checkpoint=tiny_checkpoint,
                            gpus_per_worker=0, spot_check_rate=0.0))  # fmt: skip

    rows = {r["key"]: r for r in result.manifest.to_pylist()}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    # Each 512 x 96 image is 9 x 2 tiles whole; the one spot check's round trip adds its own (by key
    # hash it is a noise image here, so tall.png's count is its own pieces').
    assert not rows["tall.png"]["spot_check"]
    # The two noise files differ in size by a few bytes: which of them is the larger is the noise's.
    assert sorted(rows[key]["piece_count"] for key in ("noise-a.png", "noise-b.png")) == [1, LAST_ROUND_BANDS]
    assert rows["tall.png"]["piece_count"] == LAST_ROUND_BANDS
    assert rows["tall.png"]["tiles"] == 9 * 2  # no tile run twice
    shared = np.asarray(Image.open(tall.store.root / "three-out" / "tall.png")).astype(int)
    whole = np.asarray(Image.open(tall.store.root / "whole" / "tall.png")).astype(int)
    assert shared.shape == whole.shape and np.abs(shared - whole).max() <= 1


@pytest.mark.parametrize(
    ("images", "actors", "spreads"),
    [(3, 2, [1, 4, 4]), (8, 2, [1] * 6 + [4, 4]), (1, 2, [4]), (3, 16, [6, 6, 6]), (17, 16, [1] + [4] * 15 + [16]),
     (32, 16, [1] * 16 + [4] * 16), (5, 1, [1] * 5)],
)  # fmt: skip
def test_only_the_last_round_of_images_is_cut(images: int, actors: int, spreads: list[int]) -> None:
    """The images left after the last full round of one an actor are cut to keep every actor busy, the
    last round's into four at least; those before stay whole, and one actor cuts nothing."""
    from pipeline.run import spread_last

    rows = [{"key": f"{i}.png"} for i in range(images)]
    assert [r["spread"] for r in spread_last(rows, actors)] == spreads


def test_at_least_one_image_is_spot_checked_at_rate_zero(tall: TallRuns) -> None:
    for result in (tall.split, tall.whole):
        checked = [r for r in result.manifest.to_pylist() if r["spot_check"]]
        assert len(checked) == 1, checked
        assert checked[0]["rt_gain_db"] is not None and math.isfinite(checked[0]["rt_gain_db"])
    # The same image on both runs, with the same scores: the round trip of a banded image is kept.
    # Within 0.001 dB: the round trip's tiles share forward passes with the first piece's, and a tile
    # in a batch of one rounds otherwise than in a larger batch (oneDNN: 1e-4 in bf16, 6e-8 in
    # float32), which can move an output pixel a level (7e-6 dB here); a lost or misplaced round trip
    # moves a score by whole dB.
    split = next(r for r in tall.split.manifest.to_pylist() if r["spot_check"])
    whole = next(r for r in tall.whole.manifest.to_pylist() if r["spot_check"])
    assert split["key"] == whole["key"] == "tall.png"
    for score in RT_SCORES:
        assert split[score] == pytest.approx(whole[score], abs=1e-3), score


# ----------------------------------------------------------------------------- 5b. pages and frames


@dataclass
class FrameRuns:
    store: Store
    pages: list[np.ndarray]  # the TIFF's pages, upright
    frames: list[np.ndarray]  # the GIF's frames as Pillow composes them
    split: RunResult
    whole: RunResult
    jpeg: RunResult
    shard: RunResult


@pytest.fixture(scope="module")
def frame_runs(ray_local: None, tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str) -> FrameRuns:
    """A 2-page TIFF (a colour page of 9 x 2 tiles, a grey page stored on its side) and a 3-frame GIF,
    upscaled with the colour page cut into bands (max_tiles=2) and whole; then asked for as JPEG; then
    as rows of a Parquet shard."""
    store = local_store(tmp_path_factory, "frames")
    colour, grey = photo("astronaut", 480, 96, 0, 200), photo("camera", 60, 40, 100, 100)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(colour, photometric="rgb")
        tif.write(grey, photometric="minisblack", extratags=[(0x0112, 3, 1, 6, True)])  # 6: turn clockwise
    store.put("src/book.tif", buffer.getvalue())
    gif = [Image.fromarray(photo("coffee", 48, 64, y, y)).quantize(dither=Image.Dither.NONE) for y in (0, 100, 200)]
    store.put(
        "src/clip.gif", encoded(gif[0], "GIF", save_all=True, append_images=gif[1:], duration=[40, 80, 120], loop=0)
    )
    with Image.open(io.BytesIO(store.get("src/clip.gif"))) as img:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)]
    common = {"checkpoint": tiny_checkpoint, "gpus_per_worker": 1, "spot_check_rate": 0.0}
    results = {
        name: run(
            RunOptions(src=store.uri("src"), dst=store.uri(name), max_tiles=max_tiles, output_format=fmt, **common)
        )
        for name, max_tiles, fmt in (("split", 2, None), ("whole", 1024, None), ("jpeg", 1024, "JPEG"))
    }
    rows = pa.table({"id": ["book", "clip"], "image": [store.get("src/book.tif"), store.get("src/clip.gif")]})
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink)
    store.put("shards/part-0.parquet", sink.getvalue().to_pybytes())
    results["shard"] = run(RunOptions(src=store.uri("shards"), dst=store.uri("shard-out"), key_column="id", **common))
    return FrameRuns(store, [colour, np.rot90(grey, -1)], frames, **results)


def test_every_page_and_frame_is_upscaled_and_kept_in_one_file(frame_runs: FrameRuns) -> None:
    """Before, the manifest said ok and the output held the first page or frame alone."""
    from model.metrics import bicubic_downscale_array

    root = frame_runs.store.root
    for name in ("split", "whole"):
        rows = {r["key"]: r for r in getattr(frame_runs, name).manifest.to_pylist()}
        assert {k: (r["status"], r["frames"]) for k, r in rows.items()} == {
            "book.tif": ("ok", 2),
            "clip.gif": ("ok", 3),
        }
        assert (rows["book.tif"]["out_width"], rows["book.tif"]["out_height"]) == (384, 1920)  # the first page's
        with Image.open(root / name / "book.tif") as book:
            pages = [np.asarray(p.copy()) for p in ImageSequence.Iterator(book)]
        with Image.open(root / name / "clip.png") as clip:
            assert clip.format == "PNG" and clip.n_frames == 3 and clip.info["loop"] == 0
            durations = [f.info["duration"] for f in ImageSequence.Iterator(clip)]
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(clip)]
        assert durations == [40, 80, 120]
        assert [p.shape for p in pages] == [(1920, 384, 3), (160, 240)]  # the grey page upright, still grey
        # Each output is its own input upscaled, in order: its downscale is within 4 % (RMS) of it,
        # where any other page or frame is over 15 % off.
        for outputs, inputs in ((pages, frame_runs.pages), (frames, frame_runs.frames)):
            for i, out in enumerate(outputs):
                error = bicubic_downscale_array(out).astype(float) - inputs[i]
                assert np.sqrt(np.mean(error**2)) < 0.04 * 255, (name, i)
    # Bands stack frame by frame as the whole frame: cutting changes a value by one level at most
    # (in the rows two bands share, the sum of two parts).
    for output in ("book.tif", "clip.png"):
        with Image.open(root / "split" / output) as a, Image.open(root / "whole" / output) as b:
            for i, (x, y) in enumerate(zip(ImageSequence.Iterator(a), ImageSequence.Iterator(b), strict=True)):
                diff = np.abs(np.asarray(x.convert("RGB")).astype(int) - np.asarray(y.convert("RGB")).astype(int))
                assert diff.max() <= 1, (output, i)
    split_rows = {r["key"]: r for r in frame_runs.split.manifest.to_pylist()}
    whole_rows = {r["key"]: r for r in frame_runs.whole.manifest.to_pylist()}
    assert split_rows["book.tif"]["piece_count"] > whole_rows["book.tif"]["piece_count"] == 2, "not cut into bands"
    assert split_rows["book.tif"]["tiles"] == whole_rows["book.tif"]["tiles"] >= 9 * 2 + 1  # each tile once
    assert whole_rows["clip.gif"]["tiles"] == 3  # one tile a frame
    assert [whole_rows[k]["in_pixels"] for k in ("book.tif", "clip.gif")] == [480 * 96 + 60 * 40, 3 * 48 * 64]
    summary = frame_runs.whole.summary  # the run's megapixels count every frame
    assert (summary["megapixels_in"], summary["megapixels_out"]) == pytest.approx((0.057696, 16 * 0.057696))
    run_dir = root / "split" / RUNS / frame_runs.split.run_id
    assert [p for p in (run_dir / "staging").rglob("*") if p.is_file()] == []


def test_a_format_of_one_picture_fails_the_file_saying_what_to_choose(frame_runs: FrameRuns) -> None:
    rows = {r["key"]: r for r in frame_runs.jpeg.manifest.to_pylist()}
    assert {k: r["status"] for k, r in rows.items()} == {"book.tif": "failed", "clip.gif": "failed"}
    assert (
        rows["book.tif"]["error"]
        == "JPEG holds one picture and this input has 2: choose --format tiff, png, webp or avif"
    )
    assert [r["tiles"] for r in rows.values()] == [0, 0]  # refused on decoding, before any model work
    assert not [p for p in (frame_runs.store.root / "jpeg").iterdir() if p.name != "_isosr"]


def test_pages_and_frames_in_a_shard_come_back_in_its_row(frame_runs: FrameRuns) -> None:
    [shard] = [p for p in (frame_runs.store.root / "shard-out").glob("*.parquet")]
    out = pq.read_table(shard).to_pylist()
    assert [r["isosr_status"] for r in out] == ["ok", "ok"]
    with Image.open(io.BytesIO(out[0]["image"])) as book, Image.open(io.BytesIO(out[1]["image"])) as clip:
        assert (book.format, book.n_frames, clip.format, clip.n_frames) == ("TIFF", 2, "PNG", 3)
    assert [r["frames"] for r in frame_runs.shard.manifest.to_pylist()] == [2, 3]


# ----------------------------------------------------------------------------- 6. the plan streams


@pytest.mark.parametrize("on", ["gpu", "cpu", "parquet"])
def test_the_plan_has_no_barrier_and_keeps_decoding_off_the_model_actor(
    ray_local: None, tiny_checkpoint: str, on: str
) -> None:
    from pipeline.run import Placement, build_dataset

    rows = [
        {"source": f"/nowhere/{i}.png", "key": f"{i}.png", "size_bytes": 1, "source_version": "v", "output": f"/out/{i}.png",
             "out_format": "PNG", "spot_check": False}
        for i in range(3)
    ]  # fmt: skip
    options = RunOptions(
        src="/nowhere", dst="/out", checkpoint=tiny_checkpoint, input_format="parquet" if on == "parquet" else None
    )
    placement = Placement(1.0, 1.0, None, (1, 2)) if on != "cpu" else Placement(0.0, 0.5, 1, (2, 2))
    ds = build_dataset(rows, options, tile=64, scale=4, placement=placement)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ds.explain()
    plan = text.getvalue()
    assert "-------- Physical Plan (Optimized) --------" in plan, plan
    physical = plan.split("-------- Physical Plan (Optimized) --------", 1)[1]
    operators = [line.strip(" +-") for line in physical.strip().splitlines()]
    kinds = {op.split("[", 1)[0] for op in operators}
    # Only streaming operators: an input buffer and map operators. A shuffle, sort, groupby,
    # aggregate or repartition would appear as an all-to-all operator here.
    assert kinds <= {"InputDataBuffer", "TaskPoolMapOperator", "ActorPoolMapOperator"}, plan
    assert not re.search(r"AllToAll|Shuffle|Aggregate|Sort|Repartition|GroupBy|Zip|Limit", physical), plan
    [model] = [op for op in operators if "TileWorker" in op]
    decoding = "read_stage" if on == "parquet" else "decode_stage"  # shards are read and decoded row by row
    assert model.startswith("ActorPoolMapOperator") and decoding not in model, plan
    assert any(decoding in op and op.startswith("TaskPoolMapOperator") for op in operators), plan
    # Model actors start with the malloc settings that save 12 % a tile on a CPU and 15-25 % of a GPU
    # actor's CPU work a photo (stages.MODEL_TUNABLES; RESULTS.md). Read from the logical plan (Ray
    # Data's own operators: no public view of a stage's remote arguments).
    op = ds._logical_plan.dag
    while op.name != "MapBatches(TileWorker)":
        [op] = op.input_dependencies
    assert op.ray_remote_args.get("runtime_env") == {"env_vars": MODEL_ENV}, op.ray_remote_args
    # Decoding runs a few tasks at once, not one per free quarter CPU: each task at once is a worker
    # process that Ray starts while the model actors load (30 of them on a 16-CPU node, RESULTS.md).
    # (Shards are read by a pool of their own size: one reader per model actor at most.)
    [decoder] = op.input_dependencies
    if on != "parquet":
        assert decoder.compute.size == DECODE_TASKS_PER_ACTOR * placement.workers[1], decoder.compute


# ----------------------------------------------------------------------------- the report in a browser


def test_a_real_runs_report_renders_in_a_browser(mixed_local: MixedRun, browser: object) -> None:
    store = mixed_local.store
    path = store.root / run_key(store, mixed_local.result, mixed_local.dst) / "report.html"
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: r.url.startswith(("file:", "data:")) or problems.append(f"went out: {r.url}"))
    page.goto(path.as_uri(), wait_until="load")

    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
    spot_checked = sum(mixed_local.result.manifest.column("spot_check").to_pylist())
    assert len(images) == 2 * spot_checked  # a before/after pair per spot-checked image
    assert all(done and w > 0 and h > 0 for done, w, h in images), images
    heights = page.locator("svg.histogram rect.bar").evaluate_all("rs => rs.map(r => r.getBBox().height)")
    assert heights and min(heights) > 0, heights
    assert page.get_by_text("Consistency PSNR (dB)").is_visible()
    assert problems == []
    page.close()
