"""The run manifest: one row per input, whatever happened to it.

Written to DST/_isosr/runs/<run_id>/manifest.parquet. For image shards, one row per row of each
shard processed, keyed by (shard, key), and one row for a shard skipped or unreadable as a whole. Write tasks also leave their rows in
DST/_isosr/runs/<run_id>/parts/ as they go, so the rows of a run that dies are not lost.
"""

from __future__ import annotations

import pyarrow as pa

OK, FAILED, SKIPPED = "ok", "failed", "skipped"

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("source", pa.string()),  # full URI of the input
        ("key", pa.string()),  # its path relative to SRC, '/'-separated; a shard's row: see shard
        ("shard", pa.string()),  # image shards (pipeline.shards): the shard's key; null for loose files
        ("row_index", pa.int64()),  # the row's position in its shard (null: the row of the whole shard)
        ("size_bytes", pa.int64()),
        ("source_version", pa.string()),  # the object's ETag, or the file's mtime (ISO 8601, UTC)
        ("status", pa.string()),  # ok | failed | skipped
        ("error", pa.string()),  # readable reason when failed or skipped
        ("output", pa.string()),  # full URI of the output, when ok (or skipped: the existing one)
        ("format", pa.string()),  # input format as Pillow names it, e.g. PNG
        ("mode", pa.string()),  # input pixel layout after decoding: L, LA, RGB, RGBA; I;16, LA;16, RGB;16, RGBA;16
        ("frames", pa.int32()),  # pages of a TIFF or frames of an animation, all upscaled; 1 for most images
        ("in_pixels", pa.int64()),  # of every frame together (width x height for most images)
        ("width", pa.int32()),  # of the first frame, as the output sizes
        ("height", pa.int32()),
        ("out_format", pa.string()),
        ("out_width", pa.int32()),
        ("out_height", pa.int32()),
        ("out_bytes", pa.int64()),
        ("tiles", pa.int32()),  # network tiles for this input, spot check included
        ("tiles_skipped", pa.int32()),  # of them, the flat ones that took the skip path alone
        ("piece_count", pa.int32()),  # pieces of work: its frames, and the bands a large frame is cut into
        ("consistency_psnr", pa.float64()),  # dB: output downscaled by the degradation vs input (RGB)
        ("spot_check", pa.bool_()),  # in the round-trip sample
        ("rt_psnr_model", pa.float64()),  # dB, RGB: SR(degrade(input)) vs input
        ("rt_psnr_bicubic", pa.float64()),  # dB, RGB: bicubic(degrade(input)) vs input
        ("rt_psnr_model_y", pa.float64()),  # the same two on Y (BT.601)
        ("rt_psnr_bicubic_y", pa.float64()),
        ("rt_gain_db", pa.float64()),  # rt_psnr_model_y - rt_psnr_bicubic_y
        ("flags", pa.string()),  # comma-separated quality flags, e.g. low-consistency
        ("decode_s", pa.float64()),
        ("model_s", pa.float64()),
        ("encode_s", pa.float64()),
        ("write_s", pa.float64()),
        ("model_sha256", pa.string()),  # the checkpoint's digest (or untrained:<variant>)
    ]
)
COLUMNS = SCHEMA.names


def table(rows: list[dict[str, object]]) -> pa.Table:
    """Rows (dicts keyed by COLUMNS; missing keys are null) as a table of SCHEMA.
    Raises KeyError naming a key that is not a manifest column."""
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"not manifest columns: {sorted(unknown)}")
    return pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS} for row in rows], schema=SCHEMA)
