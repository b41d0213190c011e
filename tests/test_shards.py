"""Image shards end to end: Parquet and WebDataset in, the same kind of shards out (pipeline.shards).

The runs use the session's local Ray and the local S3 endpoint (moto's server), as a user's would.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from pipeline import shards
from pipeline.nightly import NightlyOptions, nightly
from pipeline.run import RunOptions, UsageError, run

pytestmark = [pytest.mark.cluster]
PHOTO = skimage.data.astronaut()
STATUS = shards.STATUS_COLUMNS.names


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def crop(i: int, h: int = 40, w: int = 56) -> np.ndarray:
    return PHOTO[(23 * i) % 400 : (23 * i) % 400 + h, (37 * i) % 400 : (37 * i) % 400 + w]


def size_of(data: bytes) -> tuple[tuple[int, int], str]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size, img.mode


@pytest.fixture
def s3(ray_local: None, s3_env: str) -> tuple[object, str]:
    """(boto3 client, fresh bucket) on the session's local S3 endpoint."""
    client = boto3.client("s3", endpoint_url=s3_env)
    bucket = f"shards-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def get(client: object, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def keys_under(client: object, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# ----------------------------------------------------------------------------- Parquet


def parquet_shard(shard: int, rows: int, *, broken: dict[int, bytes | None] | None = None) -> pa.Table:
    """Rows of images with metadata of several types beside them; `broken` replaces some images."""
    images = [encoded(crop(10 * shard + i), "JPEG" if i % 2 else "PNG") for i in range(rows)]
    images[-1] = encoded(np.dstack([crop(shard), np.full(crop(shard).shape[:2], 128, np.uint8)]))  # RGBA
    for i, data in (broken or {}).items():
        images[i] = data
    table = pa.table(
        {
            "uid": [f"s{shard}-r{i}" for i in range(rows)],
            "caption": [f"a photo, number {i} ü" if i != 1 else None for i in range(rows)],
            "image": pa.array(images, pa.binary()),
            "similarity": pa.array([0.25 * i for i in range(rows)], pa.float32()),
            "tags": [[f"t{i}", "x"] if i % 3 else [] for i in range(rows)],
            "exif": [{"iso": 100 * i, "lens": "50mm"} for i in range(rows)],
        }
    )
    return table.replace_schema_metadata({"made_by": "test_shards", "shard": str(shard)})


def to_parquet(table: pa.Table, row_group_size: int = 2) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def test_parquet_shards_come_back_as_parquet_shards_with_every_row(
    s3: tuple[object, str], tiny_checkpoint: str
) -> None:
    client, bucket = s3
    inputs = {
        "laion/part-0.parquet": parquet_shard(0, 5, broken={1: b"\x89PNG\r\n\x1a\n not really", 3: None}),
        "laion/part-1.parquet": parquet_shard(1, 4, broken={2: b"GIF89a"}),
        "laion/more/part-2.parquet": parquet_shard(2, 7),  # more rows than --shard-rows: two output files
    }
    for key, table in inputs.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=to_parquet(table))
    client.put_object(Bucket=bucket, Key="in/laion/README.txt", Body=b"not a shard, not an input")

    result = run(
        RunOptions(src=f"s3://{bucket}/in", dst=f"s3://{bucket}/out", checkpoint=tiny_checkpoint, gpus_per_worker=1,
                   key_column="uid", shard_rows=5, spot_check_rate=0.0)
    )  # fmt: skip

    # Output shards at the same relative names; the long one continues in a -part- file.
    outputs = [k for k in keys_under(client, bucket, "out/") if not k.startswith("out/_isosr/")]
    assert outputs == ["out/laion/more/part-2-part-00001.parquet", "out/laion/more/part-2.parquet",
                       "out/laion/part-0.parquet", "out/laion/part-1.parquet"]  # fmt: skip
    for key, table in inputs.items():
        files = [f"out/{key}"] + ([f"out/{key[: -len('.parquet')]}-part-00001.parquet"] if table.num_rows > 5 else [])
        parts = [pq.read_table(io.BytesIO(get(client, bucket, f))) for f in files]
        assert [p.num_rows for p in parts] == [
            min(5, table.num_rows),
            *([table.num_rows - 5] if len(parts) > 1 else []),
        ]
        out = pa.concat_tables(parts)
        # The same schema, metadata included, with the status columns after the input's own.
        assert out.schema.names == table.schema.names + STATUS
        assert out.schema.metadata == table.schema.metadata
        assert out.select(table.schema.names).schema == table.schema
        # Every metadata column byte-identical, rows in the same order, keys equal.
        carried = [n for n in table.schema.names if n != "image"]
        assert out.select(carried).equals(table.select(carried))
        for i, (before, after) in enumerate(zip(table.to_pylist(), out.to_pylist(), strict=True)):
            if (
                before["image"] is not None
                and before["image"][:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0")
                and len(before["image"]) > 100
            ):
                (w, h), mode = size_of(before["image"])
                assert after["isosr_status"] == "ok", (key, i, after["isosr_error"])
                assert size_of(after["image"]) == ((4 * w, 4 * h), mode)
                assert (after["isosr_out_width"], after["isosr_out_height"]) == (4 * w, 4 * h)
                assert after["isosr_consistency_psnr"] > 25
                assert after["isosr_error"] is None
            else:  # failed rows pass through, marked, with the bytes they came with (a null stays null)
                assert after["isosr_status"] == "failed" and after["isosr_error"], (key, i)
                assert after["image"] == before["image"]
                assert after["isosr_out_width"] is None

    # The manifest: one row per input row, keyed <shard>#<uid>, each naming the file that holds it.
    manifest = result.manifest.to_pylist()
    expected = {f"laion/{k.split('laion/')[1]}#{uid}" for k, t in inputs.items() for uid in t["uid"].to_pylist()}
    assert sorted(r["key"] for r in manifest) == sorted(expected) and len(manifest) == 16
    failed = {r["key"]: r["error"] for r in manifest if r["status"] == "failed"}
    assert failed.keys() == {"laion/part-0.parquet#s0-r1", "laion/part-0.parquet#s0-r3", "laion/part-1.parquet#s1-r2"}
    assert "no image (null)" in failed["laion/part-0.parquet#s0-r3"]
    assert all(r["output"] is None for r in manifest if r["status"] == "failed")
    long_rows = sorted((r["row_index"], r["output"]) for r in manifest if r["shard"] == "laion/more/part-2.parquet")
    assert [o.rsplit("/", 1)[1] for _, o in long_rows] == ["part-2.parquet"] * 5 + ["part-2-part-00001.parquet"] * 2
    assert result.summary["counts"] == {"inputs": 16, "ok": 13, "failed": 3, "skipped": 0}

    # The shard record maps each shard to its files.
    record = json.loads(get(client, bucket, shards.record_uri("out", "laion/more/part-2.parquet")))
    assert record["outputs"] == [f"s3://{bucket}/out/laion/more/part-2.parquet",
                                 f"s3://{bucket}/out/laion/more/part-2-part-00001.parquet"]  # fmt: skip
    assert (record["rows"], record["failed_rows"], record["run_id"]) == (7, 0, result.run_id)
    assert not [k for k in keys_under(client, bucket, "out/_isosr/") if "/staging/" in k]  # staging cleaned up


# ----------------------------------------------------------------------------- WebDataset


def tar_shard(shard: int, samples: int, *, broken: int | None = None) -> tuple[bytes, list[tuple[str, str, bytes]]]:
    """A WebDataset shard: each sample an image (.jpg or .png), a caption (.txt), a .json and a
    class (.cls); keys with dots in their folders. Returns (tar bytes, [(key, ext, data)] in order)."""
    entries = []
    for i in range(samples):
        key = f"v1.2/sample-{shard:02d}-{i:04d}"
        image = encoded(crop(7 * shard + i), "JPEG" if i % 2 else "PNG")
        if i == broken:
            image = image[:60]  # truncated
        entries += [(key, "jpg" if i % 2 else "png", image), (key, "txt", f"caption {i}".encode()),
                    (key, "json", json.dumps({"i": i}).encode()), (key, "cls", str(i % 3).encode())]  # fmt: skip
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, ext, data in entries:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), entries


def test_webdataset_shards_come_back_as_tar_shards_that_ray_data_reads(
    s3: tuple[object, str], tiny_checkpoint: str
) -> None:
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from pipeline import storage

    client, bucket = s3
    made = {"wds/train-000.tar": tar_shard(0, 4, broken=2), "wds/train-001.tar": tar_shard(1, 3)}
    for key, (data, _) in made.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=data)

    result = run(
        RunOptions(src=f"s3://{bucket}/in", dst=f"s3://{bucket}/out", checkpoint=tiny_checkpoint, gpus_per_worker=1)
    )

    assert result.summary["counts"] == {"inputs": 7, "ok": 6, "failed": 1, "skipped": 0}
    failed = [r for r in result.manifest.to_pylist() if r["status"] == "failed"]
    assert [r["key"] for r in failed] == ["wds/train-000.tar#v1.2/sample-00-0002"]
    for key, (_, entries) in made.items():
        with tarfile.open(fileobj=io.BytesIO(get(client, bucket, f"out/{key}"))) as tar:
            written = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        names = [name for name, _ in written]
        # The same samples and entries in the same order, plus one status entry per sample.
        expected_names = []
        for i, (sample_key, ext, _) in enumerate(entries):
            expected_names.append(f"{sample_key}.{ext}")
            if i % 4 == 3:
                expected_names.append(f"{sample_key}.isosr.json")
        assert names == expected_names
        data = dict(written)
        for sample_key, ext, before in entries:
            after = data[f"{sample_key}.{ext}"]
            status = json.loads(data[f"{sample_key}.isosr.json"])
            if ext in ("txt", "json", "cls"):
                assert after == before
            elif status["status"] == "ok":
                (w, h), mode = size_of(before)
                assert size_of(after) == ((4 * w, 4 * h), mode) and (status["out_width"], status["out_height"]) == (
                    4 * w,
                    4 * h,
                )
            else:
                assert after == before and status["status"] == "failed" and status["error"]

    # Ray Data's own WebDataset reader reads the outputs, straight from the store.
    fs = PyFileSystem(FSSpecHandler(storage.filesystem(f"s3://{bucket}")[0]))
    rows = ray.data.read_webdataset(f"{bucket}/out/wds", filesystem=fs, decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(k for _, e in made.values() for k, x, _ in e if x == "txt")
    images = [r["png"] if isinstance(r.get("png"), bytes) else r["jpg"] for r in rows]  # a missing entry is NaN
    assert sum(size_of(image)[0] == (224, 160) for image in images) == 6


# ----------------------------------------------------------------------------- shard granularity


def test_skip_existing_and_nightly_redo_only_the_shard_that_changed(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str
) -> None:
    src, dst, night = tmp_path / "src", tmp_path / "dst", tmp_path / "night"
    src.mkdir()
    for s in range(3):
        (src / f"s{s}.parquet").write_bytes(to_parquet(parquet_shard(s, 3)))
    options = RunOptions(src=str(src), dst=str(dst), checkpoint=tiny_checkpoint, gpus_per_worker=1)
    first = run(options)
    assert first.summary["counts"]["ok"] == 9
    written = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.parquet")}

    again = run(options)  # nothing changed: one skipped row per shard, nothing rewritten
    assert [(r["key"], r["status"]) for r in again.manifest.to_pylist()] == [
        (f"s{s}.parquet", "skipped") for s in range(3)
    ]
    assert "unchanged since run" in again.manifest["error"][0].as_py()

    time.sleep(0.01)
    (src / "s1.parquet").write_bytes(to_parquet(parquet_shard(1, 2)))  # a shard replaced: 2 rows now
    third = run(options)
    rows = third.manifest.to_pylist()
    assert sorted((r["key"], r["status"]) for r in rows) == [
        ("s0.parquet", "skipped"), ("s1.parquet#0", "ok"), ("s1.parquet#1", "ok"), ("s2.parquet", "skipped")
    ]  # fmt: skip
    assert pq.read_table(dst / "s1.parquet").num_rows == 2
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("*.parquet") if p.name != "s1.parquet"} == {
        k: v for k, v in written.items() if k != "s1.parquet"
    }  # the unchanged shards were not rewritten

    # Redone with fewer rows per file, then with more: the files the shard no longer has are removed.
    split = run(dataclasses.replace(options, skip_existing=False, shard_rows=1))
    assert split.summary["counts"]["ok"] == 8
    assert sorted(p.name for p in dst.glob("s0*.parquet")) == [
        "s0-part-00001.parquet", "s0-part-00002.parquet", "s0.parquet"
    ]  # fmt: skip
    run(dataclasses.replace(options, skip_existing=False))
    assert sorted(p.name for p in dst.glob("*.parquet")) == ["s0.parquet", "s1.parquet", "s2.parquet"]

    # isosr nightly judges whole shards too.
    n1 = nightly(
        NightlyOptions(run=RunOptions(src=str(src), dst=str(night), checkpoint=tiny_checkpoint, gpus_per_worker=1))
    )
    assert n1.notes["counts"]["new"] == 3 and n1.result.summary["counts"]["ok"] == 8
    (src / "s2.parquet").write_bytes(to_parquet(parquet_shard(2, 4)))
    os.utime(src / "s2.parquet", (time.time() + 5, time.time() + 5))
    n2 = nightly(
        NightlyOptions(run=RunOptions(src=str(src), dst=str(night), checkpoint=tiny_checkpoint, gpus_per_worker=1))
    )
    counts = n2.notes["counts"]
    assert (counts["changed"], counts["unchanged"], counts["new"]) == (1, 2, 0), counts
    processed = [r for r in n2.result.manifest.to_pylist() if r["status"] == "ok"]
    assert sorted(r["key"] for r in processed) == [f"s2.parquet#{i}" for i in range(4)]
    n3 = nightly(
        NightlyOptions(run=RunOptions(src=str(src), dst=str(night), checkpoint=tiny_checkpoint, gpus_per_worker=1))
    )
    assert n3.notes["processed"] == 0 and n3.notes["counts"]["unchanged"] == 3


# ----------------------------------------------------------------------------- detection and bad shards


def test_image_columns_are_found_and_unreadable_shards_are_one_failed_row(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # Hugging Face's image feature: a struct of bytes and path, after a binary column that is not an image.
    hf = pa.table(
        {
            "label": [3, 1],
            "blob": pa.array([b"\x00\x01", b"\x02"], pa.binary()),
            "img": pa.array(
                [{"bytes": encoded(crop(1)), "path": "a.png"}, {"bytes": encoded(crop(2), "JPEG"), "path": "b.jpg"}],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
        }
    )
    (src / "hf.parquet").write_bytes(to_parquet(hf))
    (src / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (src / "noimages.parquet").write_bytes(to_parquet(pa.table({"a": [1, 2], "b": pa.array([b"x", b"y"])})))

    result = run(RunOptions(src=str(src), dst=str(tmp_path / "dst"), checkpoint=tiny_checkpoint, gpus_per_worker=1))

    rows = {r["key"]: r for r in result.manifest.to_pylist()}
    assert sorted(rows) == ["broken.parquet", "hf.parquet#0", "hf.parquet#1", "noimages.parquet"]
    assert (
        rows["broken.parquet"]["status"] == "failed"
        and "not a readable Parquet file" in rows["broken.parquet"]["error"]
    )
    assert "--image-column" in rows["noimages.parquet"]["error"] and rows["noimages.parquet"]["row_index"] is None
    out = pq.read_table(tmp_path / "dst" / "hf.parquet")
    assert out.select(["label", "blob"]).equals(hf.select(["label", "blob"]))
    assert [v["path"] for v in out["img"].to_pylist()] == ["a.png", "b.jpg"]
    assert [size_of(v["bytes"])[0] for v in out["img"].to_pylist()] == [(224, 160), (224, 160)]
    assert not (tmp_path / "dst" / "broken.parquet").exists()

    # A folder of images and shards together: the user says which.
    Image.fromarray(crop(0)).save(src / "loose.png")
    with pytest.raises(UsageError, match="--input-format"):
        run(RunOptions(src=str(src), dst=str(tmp_path / "dst2"), checkpoint=tiny_checkpoint))
    only = run(RunOptions(src=str(src), dst=str(tmp_path / "dst3"), checkpoint=tiny_checkpoint, gpus_per_worker=1,
                          input_format="images"))  # fmt: skip
    assert [r["key"] for r in only.manifest.to_pylist()] == ["loose.png"]


def test_tar_samples_group_by_key_as_webdataset_does(tmp_path: Path) -> None:
    """The reader alone: keys up to the first dot of the name, consecutive entries one sample, entries
    without an extension left out, the image entry chosen by --image-column or by suffix."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [("a/x.txt", b"1"), ("a/x.seg.png", b"mask"), ("a/x.jpg", b"img"), ("README", b"r"),
                           ("a/y.json", b"{}"), ("a.b/z.webp", b"w")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buffer.getvalue())
    shard = {"source": str(tmp_path / "s.tar"), "key": "s.tar"}
    rows = list(shards._tar_rows(shard, None, None, {}))
    assert [(key, payload, name) for _, key, payload, _, name in rows] == [
        ("a/x", b"mask", "a/x.seg.png"), ("a/y", None, None), ("a.b/z", b"w", "a.b/z.webp")
    ]  # fmt: skip
    chosen = list(shards._tar_rows(shard, "jpg", None, {}))
    assert chosen[0][2] == b"img" and chosen[0][4] == "a/x.jpg"
    assert shards._image_ext("seg.png", "JPEG") == "seg.jpg" and shards._image_ext("jpeg", "JPEG") == "jpeg"
    assert shards.output_files("s3://b/o/s.tar", 3) == [
        "s3://b/o/s.tar",
        "s3://b/o/s-part-00001.tar",
        "s3://b/o/s-part-00002.tar",
    ]


def test_a_tar_entry_whose_name_is_not_utf8_fails_its_shard_saying_which_and_what_to_do(tmp_path: Path) -> None:
    """Tar names are bytes; one in Latin-1 cannot become a row's key (Arrow strings are UTF-8). It
    used to fail the shard with a bare UnicodeEncodeError."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name in ("a.png", "caf\udce9.png"):  # b"caf\xe9.png" in the archive
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "s.tar").write_bytes(buffer.getvalue())
    assert b"caf\xe9.png" in buffer.getvalue()
    rows = shards._tar_rows({"source": str(tmp_path / "s.tar"), "key": "s.tar"}, None, None, {})
    with pytest.raises(
        shards.ShardError, match=r"s\.tar: the name of its entry caf\\xe9\.png is not valid UTF-8.*rename it"
    ):
        list(rows)


def test_a_shard_reader_stays_a_few_rows_ahead_of_the_rows_staged(ray_local: None, tmp_path: Path) -> None:
    """The read-ahead window (Assembler.may_read), counted over every shard being read: a reader may
    not yield a row while `read_ahead` rows are yielded and not yet staged, and may again once one is."""
    import ray

    from pipeline.assembly import Assembler, RunPaths
    from pipeline.report import Thresholds

    assembler = Assembler.remote(
        paths=RunPaths(dst=str(tmp_path), run_id="run"), thresholds=Thresholds(), input_format="parquet", shard_rows=10,
        read_ahead=3,
    )  # fmt: skip

    def may(key: str, yielded: int) -> bool:
        return ray.get(assembler.may_read.remote(key, yielded))

    def staged(key: str, index: int) -> None:
        ray.get(assembler.row_done.remote({"shard": key, "row_index": index, "key": f"{key}#{index}"}))

    assert [may("a", n) for n in range(3)] == [True, True, True]
    assert not may("a", 3)
    staged("a", 0)
    assert may("a", 3)  # rows 0-2 yielded, row 0 staged: 2 ahead, and now row 3
    assert not may("b", 0)  # a's rows 1-3 are ahead
    staged("a", 1)
    assert may("b", 0) and not may("b", 1)
    assert may("a", 0)  # a retried reader starts again from its first row: a has none ahead


@pytest.mark.timeout(300)
def test_a_shard_many_times_the_read_ahead_finishes_on_cpu_actors(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str
) -> None:
    """CPU actors (half a CPU each) on 2 CPUs, a shard of 40 rows, 5× the read-ahead: the reader
    waits for rows to be staged, so the finishing stage must get a CPU while it waits. It did not
    while the reader held a CPU share of its own: the run hung at row 15 (now a timeout here)."""
    src = tmp_path / "src"
    src.mkdir()
    table = pa.table({"n": list(range(40)), "image": pa.array([encoded(crop(i, 24, 24)) for i in range(40)])})
    (src / "long.parquet").write_bytes(to_parquet(table, row_group_size=16))

    result = run(RunOptions(src=str(src), dst=str(tmp_path / "dst"), checkpoint=tiny_checkpoint, gpus_per_worker=0,
                            spot_check_rate=0.0))  # fmt: skip

    assert result.summary["counts"]["ok"] == 40
    out = pq.read_table(tmp_path / "dst" / "long.parquet")
    assert out["n"].to_pylist() == list(range(40))
    assert {size_of(b)[0] for b in out["image"].to_pylist()} == {(96, 96)}


# A head that offers no CPU (cluster.yaml's), one worker node, all in this script's process: it runs
# isosr on SRC and prints, as its last line, the nodes on which a shard reader's process was seen at
# work (Ray titles a worker by the task it runs) and the run's counts.
CPU_LESS_HEAD = """
import json, sys, threading, time
from ray.cluster_utils import Cluster
from pipeline.run import RunOptions, run
from tests.sessions import processes

src, dst, checkpoint = sys.argv[1:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
worker = cluster.add_node(num_cpus=2)
node_of = {node.all_processes["raylet"][0].process.pid: name for node, name in ((cluster.head_node, "head"), (worker, "worker"))}
seen, done = set(), threading.Event()

def watch():
    while not done.is_set():
        seen.update(node_of.get(ppid, "elsewhere") for _, _, ppid, title in processes()
                    if title.startswith("ray::") and "read_stage" in title)
        time.sleep(0.02)

threading.Thread(target=watch, daemon=True).start()
result = run(RunOptions(src=src, dst=dst, checkpoint=checkpoint, address=cluster.address, spot_check_rate=0.0))
done.set()
print(json.dumps({"readers_on": sorted(seen), "counts": result.summary["counts"]}))
"""


@pytest.mark.slow
def test_shard_readers_stay_off_a_head_that_offers_no_cpu(tmp_path: Path, tiny_checkpoint: str) -> None:
    """A reader holds no CPU (see build_dataset), so Ray could place it on cluster.yaml's head, which
    declares CPU 0 to keep pipeline work off the node that runs the driver; a reader decodes every row
    of its shard. Three shards, two readers, a head and a 2-CPU worker node: no reader on the head."""
    from tests.sessions import assert_session_gone, kill_session

    src = tmp_path / "src"
    src.mkdir()
    for s in range(3):
        table = pa.table({"n": list(range(6)), "image": pa.array([encoded(crop(6 * s + i, 24, 24)) for i in range(6)])})
        (src / f"s{s}.parquet").write_bytes(to_parquet(table))
    ray_dir = tempfile.mkdtemp(prefix="isc", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_dir}
    env["RAY_AUTH_MODE"] = "disabled"  # a driver given an address sends no token unless told to
    script = subprocess.Popen(
        [sys.executable, "-c", CPU_LESS_HEAD, str(src), str(tmp_path / "dst"), tiny_checkpoint],
        cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = script.communicate(timeout=300)
    finally:
        kill_session(script.pid)
        assert_session_gone(script.pid)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert script.returncode == 0, output[-3000:]
    seen = json.loads(output.strip().splitlines()[-1])
    assert seen["counts"]["ok"] == 18, seen
    assert seen["readers_on"] == ["worker"], f"shard readers ran on {seen['readers_on']}"
