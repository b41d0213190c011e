"""Writing: the Ray Datasink that puts whole images at DST/<relative path>, and stages the bands of
large images and the rows of image shards for their assembly (pipeline.assembly)."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import ray
from ray.data import Datasink
from ray.data.datasource.datasink import WriteResult

from pipeline import quality, storage
from pipeline.assembly import RunMetrics, RunPaths, manifest_row, stage_shard_row, write_rows
from pipeline.manifest import FAILED, OK
from pipeline.report import Thresholds


class ImageSink(Datasink[list[dict[str, Any]]]):
    """Writes whole images to their output URI, bands to the run's staging area (telling the
    assembler), and returns the manifest rows it completed."""

    def __init__(self, *, paths: RunPaths, thresholds: Thresholds, assembler: ray.actor.ActorHandle) -> None:
        self.paths = paths
        self.thresholds = thresholds
        self.assembler = assembler
        self.rows: list[dict[str, Any]] = []

    def write(self, blocks, ctx) -> list[dict[str, Any]]:
        done = []
        for block in blocks:
            for row in block.to_pylist() if isinstance(block, pa.Table) else block.to_dict("records"):
                finished = self._write_row(row)
                if finished is not None:
                    done.append(finished)
        write_rows(self.paths, done)
        return done

    def _write_row(self, row: dict[str, Any]) -> dict[str, Any] | None:
        run_id, metrics = self.paths.run_id, RunMetrics.get()
        started = time.perf_counter()
        if row["status"] == OK and row["crop_before"] is not None:
            storage.write_atomic(self.paths.crop(row["key"], "before"), row["crop_before"])
            storage.write_atomic(self.paths.crop(row["key"], "after"), row["crop_after"])
        if (row["piece_count"] or 1) > 1:  # a band, ok or failed: the assembler settles its image
            if row["status"] == OK:
                storage.write_atomic(self.paths.staging(row["key"], int(row["piece_index"])), row["data"])
            meta = {k: v for k, v in row.items() if k not in ("data", "crop_before", "crop_after")}
            meta["write_s"] = time.perf_counter() - started
            ray.get(self.assembler.part_done.remote(meta))
            return None
        if row["shard"] is not None:
            self._stage_shard_row(row, started)
            return None
        if row["status"] != OK:
            out = manifest_row(row, run_id=run_id, thresholds=self.thresholds)
            metrics.record(out)
            return out
        try:
            storage.write_atomic(row["output"], row["data"])
        except OSError as e:
            out = manifest_row(row, run_id=run_id, thresholds=self.thresholds, status=FAILED, error=str(e))
            metrics.record(out)
            return out
        out = manifest_row(
            row,
            run_id=run_id,
            thresholds=self.thresholds,
            out_bytes=len(row["data"]),
            consistency_psnr=quality.psnr_from_sse(row["consistency_sse"], row["consistency_n"]),
            write_s=time.perf_counter() - started,
        )
        metrics.record(out)
        return out

    def _stage_shard_row(self, row: dict[str, Any], started: float) -> None:
        """A row of an image shard: staged for its shard's assembly (the Assembler is told), which
        writes its manifest row once the output shard is written."""
        if row["status"] == OK:
            values = {
                "out_bytes": len(row["data"]),
                "consistency_psnr": quality.psnr_from_sse(row["consistency_sse"], row["consistency_n"]),
            }
        else:
            values = {}
        out = manifest_row(row, run_id=self.paths.run_id, thresholds=self.thresholds, **values)
        stage_shard_row(self.paths, self.assembler, row, out, row["data"], started=started)

    def on_write_complete(self, write_result: WriteResult[list[dict[str, Any]]]) -> None:
        self.rows = [row for rows in write_result.write_returns for row in rows]
