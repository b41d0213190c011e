"""The pipeline's stages. Each takes and returns a Ray Data batch as a pyarrow Table (pyarrow
keeps nulls as nulls, where numpy batches turn an all-null column into NaNs) with the column
types of SCHEMA, and can be called on a hand-made batch without a cluster.

Rows are pieces of work. An ordinary image is one piece; an image with more tiles than
`max_tiles` is cut into bands (model.tiling.split_rows) so that its tiles spread over every model
actor and no worker holds more than its own output, and so are a run's last images on CPU actors,
so that the actors end together (a row's `spread`, pipeline.run.spread_last); each page of a multi-page TIFF and each frame of an animation
is one piece or more; the sink stages the pieces and one task assembles them. A row
that failed carries status "failed" and its error through every stage.

Columns, by the stage that adds them ("array" = an .npy-encoded ndarray in a binary column,
loaded with allow_pickle=False):
  listing  source, key, size_bytes, source_version, output, out_format, spot_check; rows of image
           shards (pipeline.shards) also: shard (its key), row_index, payload (the row's image bytes,
           written back unchanged if the row fails), carry (the rest of the row)
  decode   status, error, format, mode, frames (pages or frames in the file), in_pixels (of them
           all), width and height (of the piece's frame), meta (the output's images.Metadata),
           decode_s, frame (the piece's), piece_index, piece_count, band (8 ints: tile rows, owned
           output rows, input rows, output rows reached; model.tiling.Band), pixels (array: the
           band's input rows), rt_lr / rt_ref (arrays: the round-trip LR image and reference, piece
           0 of a spot-checked image only)
  model    out_pixels (array: the owned output rows), seam_above / seam_below (arrays: the band's
           parts of the rows it shares with its neighbours), rt_sr (array), tiles, model_s,
           model_sha256
  finish   data (the encoded image, or the band's rows and seams, unpack_band), out_width,
           out_height, consistency_sse, consistency_n, rt_* scores, crop_before, crop_after,
           encode_s; the pixel arrays are dropped
"""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa

from model.tiling import Band, Piece, Upscaled, plan_tiles, split_image, upscale_pieces
from pipeline import quality, storage
from pipeline.images import DecodeError, Metadata, decode, encode, frames_unfit, output_format_of
from pipeline.manifest import FAILED, OK
from pipeline.report import crop_pair

Batch = pa.Table
_STRING = ("source", "key", "source_version", "output", "out_format", "status", "error", "format", "mode",
           "model_sha256", "shard")  # fmt: skip
_INT = ("size_bytes", "width", "height", "frames", "in_pixels", "frame", "piece_index", "piece_count", "tiles",
        "tiles_skipped", "consistency_n", "out_width", "out_height", "row_index")  # fmt: skip
_FLOAT = ("decode_s", "model_s", "encode_s", "consistency_sse")
_BINARY = ("pixels", "rt_lr", "rt_ref", "out_pixels", "seam_above", "seam_below", "rt_sr", "data", "crop_before",
           "crop_after", "payload", "carry")  # fmt: skip
# images.Metadata.as_row() / from_row(): what an output carries over from its input
META = pa.struct([("icc_profile", pa.binary()), ("exif", pa.binary()), ("xmp", pa.binary()),
                  ("dpi", pa.list_(pa.float64())), ("text", pa.list_(pa.list_(pa.string()))),
                  ("iptc", pa.binary()), ("durations", pa.list_(pa.int64())), ("loop", pa.int64()),
                  ("png_colour", pa.list_(pa.binary()))])  # fmt: skip
RT_SCORES = ("rt_psnr_model", "rt_psnr_bicubic", "rt_psnr_model_y", "rt_psnr_bicubic_y", "rt_gain_db")
SCHEMA = pa.schema(
    [(c, pa.string()) for c in _STRING]
    + [(c, pa.int64()) for c in _INT]
    + [(c, pa.float64()) for c in _FLOAT + RT_SCORES]
    + [(c, pa.large_binary()) for c in _BINARY]  # large: one band of a big image can pass 2 GB
    + [("spot_check", pa.bool_()), ("band", pa.list_(pa.int64()))]
    + [("meta", META)]
)
PIXEL_COLUMNS = ("pixels", "out_pixels", "seam_above", "seam_below", "rt_lr", "rt_ref", "rt_sr")


def pack(array: np.ndarray | None) -> bytes | None:
    if array is None:
        return None
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def unpack(data: bytes | None) -> np.ndarray | None:
    return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)


def unpack_band(data: bytes) -> Upscaled:
    """A band's output as the finish stage stages it for its image's assembly: its rows, then its
    parts of the seams above and below them, three .npy arrays one after the other (a .npz would
    pass the rows, often hundreds of MB, through zipfile's copy and checksum, twice)."""
    buffer = io.BytesIO(data)
    return Upscaled(*(np.load(buffer, allow_pickle=False) for _ in range(3)))


def _rows(batch: Batch) -> list[dict[str, Any]]:
    return batch.to_pylist()


def _batch(rows: list[dict[str, Any]], columns: list[str]) -> Batch:
    """Rows as a table with SCHEMA's types for `columns` (in that order)."""
    schema = pa.schema([SCHEMA.field(c) for c in columns])
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)


def _mode(pixels: np.ndarray) -> str:
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.dtype.itemsize == 2:
        return {1: "I;16", 2: "LA;16", 3: "RGB;16", 4: "RGBA;16"}[channels]
    return {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]


DECODE_COLUMNS = [
    "source", "key", "size_bytes", "source_version", "output", "out_format", "spot_check", "shard", "row_index",
    "payload", "carry",
    "status", "error", "format", "mode", "frames", "in_pixels", "width", "height", "meta", "decode_s",
    "frame", "piece_index", "piece_count", "band", "pixels", "rt_lr", "rt_ref",
]  # fmt: skip


def decode_stage(batch: Batch, **options: Any) -> Batch:
    """Listing rows -> piece rows: read, decode, prepare, cut into pieces, and make the round-trip
    input of spot-checked images. One failed row for an input that cannot be read or decoded.
    `options`: decode_row's."""
    out: list[dict[str, Any]] = []
    for row in _rows(batch):
        out += decode_row(row, **options)
    return _batch(out, DECODE_COLUMNS)


def decode_row(
    row: dict[str, Any], *, tile: int, scale: int, halo: int, max_tiles: int, max_pixels: int | None
) -> list[dict[str, Any]]:
    """The piece rows of one input: a loose file, read from row["source"], or a shard's row, whose
    bytes are row["payload"] (then row["out_format"] None means the decoded image's own format).
    Each frame (most images have one) is cut into pieces of about `max_tiles` tiles, and a lone
    frame into row["spread"] pieces (default 1; pipeline.run.spread_last) where it is tall enough
    (model.tiling.split_image), so that that many actors can share it."""
    started = time.perf_counter()
    try:
        if row.get("shard") is None:
            data = storage.read_bytes(row["source"])
        elif row["payload"] is None:
            raise DecodeError("the row has no image (null)")
        else:
            data = row["payload"]
        image = decode(data, max_pixels=max_pixels)
        out_format = row["out_format"] or output_format_of(image.format)
        if error := frames_unfit([f.shape[:2] for f in image.frames], out_format):
            raise DecodeError(error)
        spread = (row.get("spread") or 1) if len(image.frames) == 1 else 1  # the frames spread already
        pieces = [
            (index, piece)
            for index, frame in enumerate(image.frames)
            for piece in split_image(frame, tile=tile, scale=scale, halo=halo, max_tiles=max_tiles, pieces=spread)
        ]
    except Exception as e:  # noqa: BLE001 - whatever one input does, it gets a row and the rest go on
        return [{**row, "status": FAILED, "error": _readable(e), "decode_s": time.perf_counter() - started}]
    rt = quality.round_trip_input(image.pixels, scale=scale) if row["spot_check"] else None
    h, w = image.pixels.shape[:2]
    common = {
        **row,
        "status": OK,
        "format": image.format,
        "out_format": out_format,
        "mode": _mode(image.pixels),
        "frames": len(image.frames),
        "in_pixels": sum(f.shape[0] * f.shape[1] for f in image.frames),
        "meta": image.metadata.for_output(w * scale, h * scale, scale).as_row(),
        "piece_count": len(pieces),
        "decode_s": time.perf_counter() - started,
    }
    out = []
    for i, (index, piece) in enumerate(pieces):
        b = piece.band
        out.append(
            {
                **common,
                "frame": index,
                "height": image.frames[index].shape[0],
                "width": image.frames[index].shape[1],
                "piece_index": i,
                "band": [*b.tile_rows, *b.out_rows, *b.in_rows, *b.span],
                "pixels": pack(piece.pixels),
                "rt_lr": pack(rt.lr) if rt and i == 0 else None,
                "rt_ref": pack(rt.reference) if rt and i == 0 else None,
            }
        )
    return out


def _readable(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if isinstance(error, (DecodeError, FileNotFoundError)) else f"{type(error).__name__}: {text}"


def _tiles(piece: Piece) -> int:
    """Network tiles a piece costs: its tiles, twice when alpha is a plane of its own."""
    r0, r1 = piece.band.tile_rows
    planes = 2 if piece.pixels.ndim == 3 and piece.pixels.shape[2] in (2, 4) else 1
    return (r1 - r0) * len(piece.plan.xs) * planes


def _band(values: Any) -> Band:
    v = [int(x) for x in values]
    return Band((v[0], v[1]), (v[2], v[3]), (v[4], v[5]), (v[6], v[7]))


MODEL_COLUMNS = DECODE_COLUMNS + [
    "out_pixels", "seam_above", "seam_below", "rt_sr", "tiles", "tiles_skipped", "model_s", "model_sha256",
]  # fmt: skip


# glibc's malloc settings for a model actor's process (GLIBC_TUNABLES, read when the process starts;
# other C libraries ignore it), and why. On a CPU, a forward batch allocates and frees
# activations of up to ~100 MB (8 tiles' upsampling feature maps). Ray Data calls a model actor from
# a thread of its own, and glibc serves a thread from an arena of 64 MB heaps and hands any larger
# block straight back to the kernel when it is freed (on the main thread too, for blocks over its
# mmap threshold of at most 32 MiB); so every batch faulted its activations' pages in again, each
# zeroed by the kernel: 350,000-620,000 page faults and 1.2-1.9 s of system time per 48 tiles of the
# full model, and 12 % more time per tile (RESULTS.md). One arena (the main one, which can grow past
# 64 MB), blocks of up to 256 MiB served from it, and up to 1 GiB of it kept when freed: next to no
# faults after the first batch, for ~100 MB more peak memory per actor. (glibc 2.36 takes a threshold
# this far above its own 32 MiB cap: with these settings a 100 MiB block comes from the heap, RESULTS.md.)
# On a GPU, where the CPU work around the network binds, the same holds for a piece's canvases and
# outputs (~50 MB a plane of a 512x512 photo). There pyarrow's own allocator (mimalloc) did the same
# with the Arrow batches a call takes and returns, handing their memory back and faulting it in again:
# Arrow allocates through glibc's malloc in model actors (ARROW_DEFAULT_MEMORY_POOL=system), under
# these settings. Together, 36-43 % less CPU a photo for a GPU actor's work beside the network, one
# call at a time; within the noise with 4 calls at once on 2 cores (`python jobs/bench.py --sections
# actor`, RESULTS.md).
MODEL_TUNABLES = ":".join(
    ["glibc.malloc.arena_max=1", f"glibc.malloc.mmap_threshold={256 << 20}", f"glibc.malloc.trim_threshold={1 << 30}"]
)
# For a model actor's runtime_env: Ray replaces ${GLIBC_TUNABLES} with the node's own (or nothing),
# which comes last and so wins where it sets the same tunable.
MODEL_ENV = {"GLIBC_TUNABLES": MODEL_TUNABLES + ":${GLIBC_TUNABLES}", "ARROW_DEFAULT_MEMORY_POOL": "system"}


class _OneAtATime:
    """An actor's TileUpscaler as one call of the actor sees it: forward passes one at a time, and the
    tiles this call skipped counted apart from other calls'. A GPU actor runs several calls at once,
    in threads (pipeline.run.GPU_CALLS_PER_ACTOR), so that the CPU work of some (cutting tiles,
    blending outputs) overlaps the forward pass of another; two forward passes at once would each
    take a batch sized to the GPU's free memory (TileUpscaler.batch_size)."""

    def __init__(self, runner: Any, lock: threading.Lock) -> None:
        self.runner, self.lock, self.skipped = runner, lock, 0
        self.tile_size, self.scale = runner.tile_size, runner.scale

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        with self.lock:
            before = self.runner.tiles_skipped
            out = self.runner(tiles)
            self.skipped += self.runner.tiles_skipped - before
        return out


class TileWorker:
    """The model stage: one network per actor, loaded once; tiles of every piece in the batch (and
    of the round-trip LR images) share forward batches of `batch_size` tiles (None: the device's
    own choice, TileUpscaler.batch_size). Calls may run at once, in threads (_OneAtATime)."""

    def __init__(
        self,
        *,
        checkpoint: str | None,
        checkpoint_sha256: str | None = None,
        device: str | None,
        precision: str,
        batch_size: int | None,
        halo: int,
        threads: int | None,
        skip_detail: float = 0.0,
        compile: bool = False,
    ) -> None:
        import torch

        from model.inference import TileUpscaler, load_model

        # Checked again here, not only in the driver: the object could change between the two reads.
        source = load_model(checkpoint, sha256=checkpoint_sha256)
        self.runner = TileUpscaler(
            source.model, device=device, dtype=precision, skip_detail=skip_detail, compile=compile
        )
        if self.runner.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.version = source.version
        self.batch_size = self.runner.largest_batch = batch_size or self.runner.batch_size()
        self.halo = halo
        self.forward_lock = threading.Lock()

    def __call__(self, batch: Batch) -> Batch:
        rows = _rows(batch)
        work: list[tuple[dict[str, Any], str, Piece]] = []
        tile, scale = self.runner.tile_size, self.runner.scale
        for row in rows:
            row.update(out_pixels=None, seam_above=None, seam_below=None, rt_sr=None, tiles=0, tiles_skipped=0,
                       model_s=0.0, model_sha256=self.version)  # fmt: skip
            if row["status"] != OK:
                continue
            plan = plan_tiles(int(row["height"]), int(row["width"]), tile=tile, halo=self.halo)
            piece = Piece(unpack(row["pixels"]), plan, _band(row["band"]))
            work.append((row, "out_pixels", piece))
            if row["rt_lr"] is not None:
                lr = unpack(row["rt_lr"])
                work.append((row, "rt_sr", split_image(lr, tile=tile, scale=scale, halo=self.halo)[0]))
        started = time.perf_counter()
        runner = _OneAtATime(self.runner, self.forward_lock)
        outputs = upscale_pieces((p for _, _, p in work), runner, batch_size=self.batch_size)
        for (row, column, piece), output in zip(work, outputs):
            row[column] = pack(output.rows)
            if column == "out_pixels":
                row.update(seam_above=pack(output.seam_above), seam_below=pack(output.seam_below))
            row["tiles"] += _tiles(piece)
        elapsed = time.perf_counter() - started
        skipped = runner.skipped
        total = sum(r["tiles"] for r in rows) or 1
        for row in rows:
            share = row["tiles"] / total  # the call's time and skipped tiles, shared by tiles
            row["model_s"] = elapsed * share
            row["tiles_skipped"] = round(skipped * share)
        return _batch(rows, MODEL_COLUMNS)


def _finish_row(row: dict[str, Any], scale: int) -> None:
    out = unpack(row["out_pixels"])
    pixels = unpack(row["pixels"])
    band = _band(row["band"])
    first, last = band.out_rows[0] // scale, band.out_rows[1] // scale
    own_input = pixels[first - band.in_rows[0] : last - band.in_rows[0]]
    sse, n = quality.consistency_sse(out, own_input, top=first == 0, bottom=last == int(row["height"]), scale=scale)
    row.update(consistency_sse=sse, consistency_n=n)
    if row["rt_sr"] is not None:
        rt = quality.RoundTripInput(unpack(row["rt_ref"]), unpack(row["rt_lr"]))
        row.update(quality.round_trip_scores(unpack(row["rt_sr"]), rt))
    row.update(out_width=out.shape[1], out_height=int(row["height"]) * scale)
    if row["spot_check"] and int(row["piece_index"]) == 0:
        row["crop_before"], row["crop_after"] = crop_pair(own_input, out, scale=scale)
    if int(row["piece_count"]) == 1:
        row["data"] = encode(out, row["out_format"], metadata=Metadata.from_row(row["meta"]))
    else:
        row["data"] = row["out_pixels"] + row["seam_above"] + row["seam_below"]  # as packed: unpack_band


FINISH_COLUMNS = [c for c in MODEL_COLUMNS if c not in PIXEL_COLUMNS] + [
    "data", "out_width", "out_height", "consistency_sse", "consistency_n", *RT_SCORES,
    "crop_before", "crop_after", "encode_s",
]  # fmt: skip


def finish_stage(batch: Batch, *, scale: int) -> Batch:
    """Quality checks and encoding, on CPU: consistency of every piece's own rows (not of the few
    rows it shares with a neighbouring band, model.tiling.Band), round-trip scores, the
    encoded output of whole images (or the raw rows of a band), before/after crops of spot checks."""
    rows = _rows(batch)
    for row in rows:
        row.update(data=None, out_width=None, out_height=None, consistency_sse=0.0,
                   consistency_n=0, crop_before=None, crop_after=None, encode_s=0.0)  # fmt: skip
        row.update({k: None for k in RT_SCORES})
        if row["status"] != OK:
            continue
        started = time.perf_counter()
        try:
            _finish_row(row, scale)
        except Exception as e:  # noqa: BLE001 - e.g. an output too large for its format
            row.update(status=FAILED, error=_readable(e), data=None, crop_before=None, crop_after=None)
        row["encode_s"] = time.perf_counter() - started
    return _batch(rows, FINISH_COLUMNS)
