"""Assembly: what finishes the images and shards that the pipeline wrote in parts, and the run's
records. One Assembler actor per run counts the staged bands of each large image (and the staged
rows of each image shard) and starts the task that stacks, encodes and writes it once all are in.

Every input ends as exactly one manifest row: written by the sink (pipeline.sink) for whole images
and failures, by the assembly tasks here for banded images and shards. Each writer also leaves its
rows as a Parquet part in DST/_isosr/runs/<run_id>/parts/, so a run that dies keeps the record of what
it finished.

This module does not import Ray Data (the sink's Datasink does, ~0.3 CPU-s): the Assembler's process
and the assembly tasks need none of it, and on a small node the Assembler starts while the model
actors load.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from model.tiling import stack_pieces
from pipeline import quality, shards, storage
from pipeline.images import Metadata, encode_frames
from pipeline.manifest import COLUMNS, FAILED, OK, table
from pipeline.report import LOW_CONSISTENCY, Thresholds
from pipeline.stages import RT_SCORES, unpack_band


@dataclass(frozen=True, kw_only=True)
class RunPaths:
    dst: str
    run_id: str

    @property
    def run_dir(self) -> str:
        return storage.run_dir(self.dst, self.run_id)

    def part(self, name: str) -> str:
        return f"{self.run_dir}/parts/{name}.parquet"

    def staging(self, key: str, index: int) -> str:
        return f"{self.run_dir}/staging/{storage.key_digest(key)}/{index:05d}.npy"

    def shard_row(self, shard: str, index: int) -> str:
        return f"{self.run_dir}/staging/shards/{storage.key_digest(shard)}/{index:09d}.arrow"

    def crop(self, key: str, which: str) -> str:
        return f"{self.run_dir}/crops/{storage.key_digest(key)}-{which}.png"


def write_rows(paths: RunPaths, rows: list[dict[str, Any]]) -> None:
    """Leave manifest rows as a Parquet part of the run (a unique name per writer)."""
    if rows:
        sink = pa.BufferOutputStream()
        pq.write_table(table(rows), sink)
        storage.write_atomic(paths.part(uuid.uuid4().hex), sink.getvalue().to_pybytes())


class RunMetrics:
    """Counters for the Ray dashboard / Prometheus (ray.util.metrics), made once per process."""

    _made: RunMetrics | None = None

    def __init__(self) -> None:
        from ray.util import metrics

        self.images = metrics.Counter("isosr_images", description="inputs finished, by status", tag_keys=("status",))
        self.megapixels = metrics.Counter("isosr_output_megapixels", description="output megapixels written")
        db = [20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 45, 50, 60]
        # Histogram boundaries must be positive, so the gain (often negative for bad weights) is
        # exported as the two PSNRs it is the difference of (mean gain = the sums' difference / count),
        # plus a gauge of the latest gain.
        self.rt_model = metrics.Histogram(
            "isosr_roundtrip_psnr_model_db", description="round-trip PSNR of the model (Y), dB", boundaries=db
        )
        self.rt_bicubic = metrics.Histogram(
            "isosr_roundtrip_psnr_bicubic_db", description="round-trip PSNR of bicubic (Y), dB", boundaries=db
        )
        self.gain = metrics.Gauge("isosr_roundtrip_gain_db", description="latest round-trip gain over bicubic (Y), dB")
        self.consistency = metrics.Histogram(
            "isosr_consistency_psnr_db", description="consistency PSNR, dB", boundaries=db
        )

    @classmethod
    def get(cls) -> RunMetrics:
        if cls._made is None:
            cls._made = cls()
        return cls._made

    def record(self, row: dict[str, Any]) -> None:
        self.images.inc(1, tags={"status": row["status"]})
        if row["status"] == OK:
            first = row["width"] * row["height"]  # the first frame's; every frame is scaled alike
            self.megapixels.inc((row.get("in_pixels") or first) * row["out_width"] * row["out_height"] / first / 1e6)
            if row.get("consistency_psnr") is not None and np.isfinite(row["consistency_psnr"]):
                self.consistency.observe(row["consistency_psnr"])
            if row.get("rt_gain_db") is not None and np.isfinite(row["rt_gain_db"]):
                self.rt_model.observe(row["rt_psnr_model_y"])
                self.rt_bicubic.observe(row["rt_psnr_bicubic_y"])
                self.gain.set(row["rt_gain_db"])


def manifest_row(row: dict[str, Any], *, run_id: str, thresholds: Thresholds, **values: Any) -> dict[str, Any]:
    """A manifest row from a pipeline row (extra columns dropped) plus `values`, with its flags."""
    out = {c: row.get(c) for c in COLUMNS if c in row}
    out.update(values, run_id=run_id)
    if out.get("status") != OK:
        out["output"] = None
    flags = []
    psnr = out.get("consistency_psnr")
    if out.get("status") == OK and psnr is not None and psnr < thresholds.min_consistency_psnr:
        flags.append(LOW_CONSISTENCY)
    out["flags"] = ",".join(flags) or None
    return out


@ray.remote(num_cpus=0)
class Assembler:
    """One per run, so that each large image and each shard is assembled once. Counts the staged
    bands of each large image and, when the last arrives, starts the task that assembles, encodes and
    writes it; counts the staged rows of each image shard and, once its reader has said how many
    there are and all are staged, starts the task that writes its output shards (pipeline.shards)."""

    def __init__(
        self, *, paths: RunPaths, thresholds: Thresholds, input_format: str, shard_rows: int, read_ahead: int
    ) -> None:
        self.paths = paths
        self.thresholds = thresholds
        self.input_format = input_format
        self.shard_rows = shard_rows
        self.read_ahead = read_ahead
        self.parts: dict[str, dict[int, dict[str, Any]]] = {}
        self.shards: dict[str, dict[str, Any]] = {}  # shard key -> {"rows": {index: manifest row}, "read": meta}
        self.yielded: dict[str, int] = {}  # shard key -> rows its reader has yielded (see may_read)
        self.assembled: set[str] = set()  # shards handed to assemble_shard (a retried reader reports twice)
        self.tasks: list[ray.ObjectRef] = []

    def part_done(self, meta: dict[str, Any]) -> None:
        parts = self.parts.setdefault(meta["key"], {})
        parts[int(meta["piece_index"])] = meta
        if len(parts) == int(meta["piece_count"]):
            ordered = [parts[i] for i in range(len(parts))]
            del self.parts[meta["key"]]
            me = ray.get_runtime_context().current_actor
            self.tasks.append(assemble.remote(self.paths, self.thresholds, ordered, me))

    def row_done(self, row: dict[str, Any]) -> None:
        """A shard's row is staged; `row` is its manifest row, without its output yet."""
        if row["shard"] in self.assembled:  # a retried reader's repeat of a row already written
            return
        self.shards.setdefault(row["shard"], {"rows": {}, "read": None})["rows"][int(row["row_index"])] = row
        self._maybe_assemble(row["shard"])

    def may_read(self, key: str, yielded: int) -> bool:
        """May the reader of shard `key`, which has yielded `yielded` rows, yield another? Yes while
        fewer than `read_ahead` rows of all shards are yielded and not yet staged. Ray Data's
        back-pressure stops it launching tasks, not a task that runs: without this a shard's reader
        runs ahead of the model and its rows wait in the object store (RESULTS.md, "Image shards")."""
        if key in self.assembled:
            return True
        self.yielded[key] = yielded  # a retried reader starts again from 0
        ahead = sum(max(0, n - len(self.shards.get(k, {"rows": ()})["rows"])) for k, n in self.yielded.items())
        if ahead >= self.read_ahead:
            return False
        self.yielded[key] = yielded + 1  # the row it yields now
        return True

    def shard_read(self, meta: dict[str, Any]) -> None:
        """A shard's reader is done: meta is its listing row plus rows (how many it yielded), error,
        and for Parquet its schema and image column."""
        if meta["key"] in self.assembled:
            return
        self.shards.setdefault(meta["key"], {"rows": {}, "read": None})["read"] = meta
        self._maybe_assemble(meta["key"])

    def _maybe_assemble(self, key: str) -> None:
        shard = self.shards[key]
        meta = shard["read"]
        if key in self.assembled or meta is None or len(shard["rows"]) < meta["rows"]:
            return
        self.assembled.add(key)
        rows = [shard["rows"][i] for i in range(meta["rows"])]
        del self.shards[key]
        self.yielded.pop(key, None)
        self.tasks.append(assemble_shard.remote(self.paths, self.input_format, self.shard_rows, meta, rows))

    def pending(self) -> list[ray.ObjectRef]:
        """The assembly tasks started since the last call (each returns its manifest rows). Assembling
        a band of a shard's row starts its shard's assembly: call until it returns none."""
        tasks, self.tasks = self.tasks, []
        return tasks

    def unfinished(self) -> list[str]:
        """Shards that never completed (none, unless a reader or a write was lost)."""
        return sorted(self.shards)


def assembled_rows(assembler: ray.actor.ActorHandle) -> list[dict[str, Any]]:
    """Wait for every assembly the run started (see Assembler.pending); their manifest rows."""
    rows = []
    while tasks := ray.get(assembler.pending.remote()):
        rows += [row for done in ray.get(tasks) for row in done]
    return rows


@ray.remote(num_cpus=1)
def assemble(
    paths: RunPaths, thresholds: Thresholds, parts: list[dict[str, Any]], assembler: ray.actor.ActorHandle
) -> list[dict[str, Any]]:
    """Stack the bands of each frame of one image (each read once into the final array, so the task
    holds the output and no more), encode, write; return its manifest row. A band that failed fails
    the image. The row of an image shard is staged for its shard instead (and no row returned: the
    shard's own assembly returns it)."""
    first = parts[0]
    started = time.perf_counter()
    failed = next((m for m in parts if m["status"] != OK), None)
    try:
        if failed is not None:
            raise ValueError(f"band {failed['piece_index'] + 1} of {len(parts)}: {failed['error']}")
        frames: list[np.ndarray] = []
        for _, metas in itertools.groupby(parts, key=lambda meta: int(meta["frame"] or 0)):
            metas = list(metas)
            staged = (
                unpack_band(storage.read_bytes(paths.staging(first["key"], int(m["piece_index"])))) for m in metas
            )
            frame, row_at = None, 0
            for rows in stack_pieces(staged):  # a band's own rows, then the seam it shares with the next
                if frame is None:
                    shape = (int(metas[0]["out_height"]), int(metas[0]["out_width"]), *rows.shape[2:])
                    frame = np.empty(shape, rows.dtype)
                frame[row_at : row_at + rows.shape[0]] = rows
                row_at += rows.shape[0]
            frames.append(frame)
        data = encode_frames(frames, first["out_format"], metadata=Metadata.from_row(first["meta"]))
        if first["shard"] is None:
            storage.write_atomic(first["output"], data)
    except Exception as e:  # noqa: BLE001 - one image's failure is its row, never the run's
        row = manifest_row(first, run_id=paths.run_id, thresholds=thresholds, status=FAILED, error=str(e))
    else:
        sse = sum(float(m["consistency_sse"]) for m in parts)
        count = sum(int(m["consistency_n"]) for m in parts)
        row = manifest_row(
            first,
            run_id=paths.run_id,
            thresholds=thresholds,
            out_bytes=len(data),
            tiles=sum(int(m["tiles"]) for m in parts),
            tiles_skipped=sum(int(m["tiles_skipped"]) for m in parts),
            consistency_psnr=quality.psnr_from_sse(sse, count),
            model_s=sum(float(m["model_s"]) for m in parts),
            encode_s=sum(float(m["encode_s"]) for m in parts) + time.perf_counter() - started,
            write_s=sum(float(m["write_s"]) for m in parts),
            **{k: first.get(k) for k in RT_SCORES},
        )
    storage.remove(paths.staging(first["key"], 0).rsplit("/", 1)[0])
    if first["shard"] is not None:
        stage_shard_row(paths, assembler, first, row, data if row["status"] == OK else None)
        return []
    RunMetrics.get().record(row)
    write_rows(paths, [row])
    return [row]


def stage_shard_row(
    paths: RunPaths,
    assembler: ray.actor.ActorHandle,
    row: dict[str, Any],
    out: dict[str, Any],
    data: bytes | None,
    *,
    started: float | None = None,
) -> None:
    """Stage a finished row of an image shard for its shard's assembly (assemble_shard), then tell the
    Assembler. `row`: the pipeline's row; `out`: its manifest row; `data`: its encoded output (a failed
    row passes its input bytes through as they came). `started`: when its write began (write_s)."""
    data = data if out["status"] == OK else row["payload"]
    storage.write_atomic(paths.shard_row(row["shard"], int(row["row_index"])), shards.staged_row({**row, **out}, data))
    if started is not None:
        out["write_s"] = time.perf_counter() - started
    ray.get(assembler.row_done.remote(out))


@ray.remote(num_cpus=1)
def assemble_shard(
    paths: RunPaths, input_format: str, shard_rows: int, meta: dict[str, Any], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Write one shard's output files from its staged rows, then its shard record; return the manifest
    rows of its rows, each naming the file that holds it. A shard that could not be read, or whose
    output cannot be written, is one failed row."""
    started = time.perf_counter()
    error = meta["error"]
    if error is None:
        try:
            staged = [paths.shard_row(meta["key"], int(r["row_index"])) for r in rows]
            files = shards.write_shard(input_format, meta, staged, shard_rows)
        except Exception as e:  # noqa: BLE001 - one shard's failure is its row, never the run's
            error = f"cannot write its output shard: {type(e).__name__}: {e}"
    if error is not None:
        if rows:
            error += f" ({len(rows)} rows read before this are not written)"
        rows = [{"run_id": paths.run_id, "source": meta["source"], "key": meta["key"], "shard": meta["key"],
                 "size_bytes": meta["size_bytes"], "source_version": meta["source_version"], "status": FAILED,
                 "error": error}]  # fmt: skip
    else:
        seconds = (time.perf_counter() - started) / max(1, len(rows))
        for i, row in enumerate(rows):
            row["output"] = files[i // shard_rows] if row["status"] == OK else None
            row["write_s"] = (row.get("write_s") or 0.0) + seconds
        model = next((r["model_sha256"] for r in rows if r.get("model_sha256")), None)
        failed = sum(r["status"] != OK for r in rows)
        shards.write_record(paths.dst, meta, outputs=files, run_id=paths.run_id, failed_rows=failed, model=model)
    storage.remove(paths.shard_row(meta["key"], 0).rsplit("/", 1)[0])
    for row in rows:
        RunMetrics.get().record(row)
    write_rows(paths, rows)
    return rows
