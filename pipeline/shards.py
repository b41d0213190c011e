"""Image shards: Parquet files with a column of image bytes, and WebDataset tar files.

A shard is one input of the listing: planning, --skip-existing and isosr nightly judge whole shards
(a shard is redone only when it changed). Each of its rows is a manifest row (columns `shard` and
`row_index`; `key` is "<shard key>#<row key>", the row key being the --key-column value, the
WebDataset sample key, or the row's index), and goes through the same decode, model and finish stages as a loose file.

Reading streams: `read_stage` reads a shard a few rows at a time (pyarrow's batch reader without
pre-buffering; tarfile's stream mode) and yields each row as it goes, at most a few rows per model
actor ahead of the rows the sink has staged (the Assembler keeps count), so how much of a shard is
in memory is bounded, whatever its size. Each row carries
the rest of its record (`carry`: the Parquet row with its image bytes nulled, or the sample's other
tar entries) as Arrow IPC bytes, so what is carried through is byte-identical.

Writing mirrors the input. The sink stages each finished row under the run's staging area and
tells the Assembler; when a shard's reader has reported its row count and every row is staged,
`assemble_shard` streams the staged rows, in input order, into output shards at the input's
relative name (`a/s.parquet`; a shard of more than --shard-rows rows continues in
`a/s-part-00001.parquet`, ...), each file written whole or not at all (storage.open_atomic):
  Parquet: the input's schema and metadata, the image column's bytes replaced by the ×4 output,
           plus STATUS_COLUMNS (status, error, output size, consistency and spot-check PSNRs);
  WebDataset: the same sample keys and entries, the image entry replaced (its extension follows
           the output format) and a `<key>.isosr.json` entry with the same status fields.
A failed row (undecodable or null image) is written too, with its original bytes and its status.
Then a shard record, DST/_isosr/shards/<digest>.json, maps the shard to its output files; it is
what --skip-existing checks. A shard that cannot be read at all (not Parquet, a broken tar) is one
failed manifest row, key = the shard's key, row_index null, and writes nothing.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.images import FORMATS, OUTPUT_SUFFIX, names_output
from pipeline.images import output_format as _output_format
from pipeline.manifest import FAILED, OK, SKIPPED

IMAGES, PARQUET, WEBDATASET = "images", "parquet", "webdataset"
INPUT_FORMATS = (IMAGES, PARQUET, WEBDATASET)
SHARD_FORMATS = (PARQUET, WEBDATASET)
SUFFIXES = {IMAGES: tuple(FORMATS), PARQUET: (".parquet",), WEBDATASET: (".tar",)}
DEFAULT_SHARD_ROWS = 1000  # rows per output file: ×4 outputs are ~16× the input's bytes
READ_BATCH_ROWS = 8  # rows per pyarrow read: a few images, not a row group
READ_POLL_SECONDS = (0.01, 0.5)  # a reader waiting for its rows to be staged asks this often (first, most)
ROW_GROUP_BYTES = 64 * 2**20  # an output row group is written when its images reach this size
RECORDS_DIR = f"{storage.STATE_DIR}/shards"
STATUS_COLUMNS = pa.schema(
    [
        ("isosr_status", pa.string()),  # ok | failed
        ("isosr_error", pa.string()),
        ("isosr_out_width", pa.int32()),
        ("isosr_out_height", pa.int32()),
        ("isosr_consistency_psnr", pa.float64()),  # dB
        ("isosr_rt_psnr_model_y", pa.float64()),  # dB, spot-checked rows only
        ("isosr_rt_psnr_bicubic_y", pa.float64()),
    ]
)
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression=None)


class ShardError(ValueError):
    """A shard that cannot be read as its format; the message names it and says why."""


def kind_of(key: str) -> str:
    """The input format a file's suffix names (loose image for anything else)."""
    suffix = posixpath.splitext(key)[1].lower()
    return next((kind for kind in SHARD_FORMATS if suffix in SUFFIXES[kind]), IMAGES)


def list_src(
    src: str, dst: str, requested: str | None, *, ignored: Counter[str] | None = None
) -> tuple[str, list[storage.InputFile]]:
    """(input format, listing). `requested` None detects it from what is under SRC: loose images,
    Parquet shards or tar shards, and refuses a mix (ValueError naming the counts). `ignored`: as
    storage.list_inputs."""
    if requested:
        return requested, storage.list_inputs(src, exclude=[dst], suffixes=SUFFIXES[requested], ignored=ignored)
    suffixes = [s for kind in INPUT_FORMATS for s in SUFFIXES[kind]]
    found = storage.list_inputs(src, exclude=[dst], suffixes=suffixes, ignored=ignored)
    kinds: dict[str, int] = {}
    for f in found:
        if f.error is None:  # a folder that cannot be listed is of no kind
            kinds[kind_of(f.key)] = kinds.get(kind_of(f.key), 0) + 1
    if len(kinds) > 1:
        what = ", ".join(f"{n} {_NAMES[k]}" for k, n in sorted(kinds.items()))
        raise ValueError(f"{src} holds {what}; say which to upscale with --input-format {'|'.join(INPUT_FORMATS)}")
    return (next(iter(kinds)) if kinds else IMAGES), found


_NAMES = {IMAGES: "loose image files", PARQUET: "Parquet shards (.parquet)", WEBDATASET: "WebDataset shards (.tar)"}


def output_files(first: str, count: int) -> list[str]:
    """The URIs of a shard's `count` output files: `first` (the input's relative name under DST),
    then <stem>-part-00001<suffix>, ..."""
    stem, suffix = posixpath.splitext(first)
    return [first] + [f"{stem}-part-{i:05d}{suffix}" for i in range(1, count)]


def record_uri(dst: str, key: str) -> str:
    return storage.join(dst, f"{RECORDS_DIR}/{storage.key_digest(key)}.json")


def finished_record(dst: str, f: storage.InputFile, files: set[str]) -> dict[str, Any] | None:
    """The shard record of `f` when it says the shard, as it is now (size and version), was written
    and all its output files are there (`files`: DST's listing); else None."""
    try:
        record = json.loads(storage.read_bytes(record_uri(dst, f.key)))
    except FileNotFoundError:
        return None
    if (record.get("key"), record.get("size_bytes"), record.get("source_version")) != (f.key, f.size, f.version):
        return None
    if not all(storage.filesystem(uri)[1] in files for uri in record["outputs"]):
        return None
    return record


def skipped_row(f: storage.InputFile, record: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The one manifest row of a shard left alone by --skip-existing."""
    return {
        "run_id": run_id,
        "source": f.uri,
        "key": f.key,
        "shard": f.key,
        "size_bytes": f.size,
        "source_version": f.version,
        "status": SKIPPED,
        "output": record["outputs"][0],
        "error": f"shard unchanged since run {record['run_id']}, which wrote its {record['rows']} rows to "
        f"{len(record['outputs'])} file(s) (use --overwrite to redo)",
    }


# ----------------------------------------------------------------------------- reading


def read_stage(batch: pa.Table, *, fmt: str, image_column: str | None, key_column: str | None,
               output_format: str | None, spot_check_rate: float, assembler: Any, decode: dict[str, Any]
               ) -> Iterator[pa.Table]:  # fmt: skip
    """Ray Data stage, a generator: shard listing rows -> the piece rows of every row of each shard
    (stages.decode_row), yielded row by row. When a shard is read to its end, or fails, the
    Assembler is told how many rows it yielded."""
    import ray

    from pipeline import quality
    from pipeline.stages import DECODE_COLUMNS, _batch, _readable, decode_row

    for shard in batch.to_pylist():
        rows, error, info = 0, None, {}
        try:
            reader = _parquet_rows if fmt == PARQUET else _tar_rows
            for index, key, payload, carry, name in reader(shard, image_column, key_column, info):
                _wait_to_read(assembler, shard["key"], rows)
                full = f"{shard['key']}#{key}"
                row = {
                    **shard,
                    "key": full,
                    "row_index": index,
                    "size_bytes": len(payload or b""),
                    "out_format": output_format or (_output_format(name) if name else None),
                    "spot_check": quality.in_sample(full, spot_check_rate) or (shard["spot_check"] and index == 0),
                    "payload": payload,
                    "carry": carry,
                }
                yield _batch(decode_row(row, **decode), DECODE_COLUMNS)
                rows += 1
        except Exception as e:  # noqa: BLE001 - a shard that cannot be read is its row, never the run's
            error = _readable(e)
        ray.get(assembler.shard_read.remote({**shard, **info, "rows": rows, "error": error}))


def _wait_to_read(assembler: Any, key: str, yielded: int) -> None:
    """Until the Assembler lets the reader of shard `key` yield another row (Assembler.may_read)."""
    import ray

    pause = READ_POLL_SECONDS[0]
    while not ray.get(assembler.may_read.remote(key, yielded)):
        time.sleep(pause)
        pause = min(2 * pause, READ_POLL_SECONDS[1])


def _parquet_rows(shard: dict[str, Any], image_column: str | None, key_column: str | None, info: dict[str, Any]):
    """(row index, key, image bytes, carry, None) for each row of a Parquet shard; `info` gets the
    file's schema (IPC bytes) and the image column's name."""
    fs, path = storage.filesystem(shard["source"])
    with fs.open(path, "rb") as f:
        try:
            # pyarrow reads a whole row group whatever is asked of it (measured: ~2x the row group's
            # size in Arrow memory): without pre-buffering it at least does not fetch ahead of that.
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=2**20)
        except pa.ArrowException as e:
            raise ShardError(f"{shard['source']} is not a readable Parquet file ({e})") from None
        schema = pf.schema_arrow
        if key_column is not None and key_column not in schema.names:
            raise ShardError(f"{shard['source']} has no column {key_column!r} (--key-column); it has {schema.names}")
        column = image_column
        if column is not None and column not in schema.names:
            raise ShardError(f"{shard['source']} has no column {column!r} (--image-column); it has {schema.names}")
        info["schema"] = schema.serialize().to_pybytes()
        index = 0
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            if column is None:
                column = _find_image_column(table, shard["source"])
            info["image_column"] = column
            images = _image_bytes(table.column(column))
            carried = table.set_column(
                table.schema.get_field_index(column),
                schema.field(column),
                _with_image_bytes(table.column(column), [None] * len(table)),
            )
            keys = table.column(key_column).to_pylist() if key_column else [None] * len(table)
            for i in range(len(table)):
                key = str(index) if keys[i] is None else str(keys[i])
                yield index, key, images[i], _ipc(carried.slice(i, 1)), None
                index += 1


def _find_image_column(table: pa.Table, source: str) -> str:
    """The first binary column (or Hugging Face image struct, {bytes, path}) whose first non-null value
    Pillow recognizes as an image."""
    for name in table.column_names:
        values = _image_bytes(table.column(name)) if _is_image_type(table.schema.field(name).type) else []
        sample = next((v for v in values if v), None)
        if sample is not None and _is_image(sample):
            return name
    raise ShardError(
        f"{source}: no binary column of images in its first rows (columns: {table.column_names}); "
        "name it with --image-column"
    )


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0 and _is_image_type(t.field("bytes").type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Exception:  # noqa: BLE001 - not an image, whatever Pillow's plugins raise
        return False


def _image_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    if not _is_image_type(column.type):
        raise ShardError(f"column of type {column.type} does not hold image bytes (binary, or a struct with 'bytes')")
    if pa.types.is_struct(column.type):
        return [None if v is None else v.get("bytes") for v in column.to_pylist()]
    return column.to_pylist()


def _with_image_bytes(column: pa.ChunkedArray, values: list[bytes | None]) -> pa.Array:
    """`column` with its image bytes replaced by `values` (the struct's other fields, e.g. a Hugging
    Face image's path, and its nulls kept)."""
    column = column.combine_chunks()
    if not pa.types.is_struct(column.type):
        return pa.array(values, type=column.type)
    t = column.type
    children = [pa.array(values, type=t.field(i).type) if t.field(i).name == "bytes" else column.field(i)
                for i in range(t.num_fields)]  # fmt: skip
    return pa.StructArray.from_arrays(children, fields=list(t), mask=column.is_null())


# WebDataset's convention (and Ray Data's reader's): a sample's key is the entry's path up to the first
# '.' of its name, the rest is the entry's extension; consecutive entries with one key are a sample.
_ENTRY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _tar_rows(shard: dict[str, Any], image_column: str | None, key_column: str | None, info: dict[str, Any]):
    """(sample index, key, image bytes, carry, image entry name) for each sample of a tar shard;
    the image entry is the one with extension `image_column`, else the first with an image suffix."""
    fs, path = storage.filesystem(shard["source"])
    index = 0
    with fs.open(path, "rb") as f:
        sample: list[tuple[str, bytes, int]] = []
        key = None
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:  # a stream: members are read in order, once
                for member in tar:
                    if not member.isfile():
                        continue
                    name = storage.printable(member.name)  # tar names are bytes; keys are text
                    if name != member.name:
                        raise ShardError(f"{shard['source']}: the name of its entry {name} is not valid UTF-8 "
                                         "(\\xNN: the bytes that are not); rename it")  # fmt: skip
                    match = _ENTRY.match(member.name)
                    if match is None:
                        continue  # no extension: not part of any sample, as in WebDataset
                    entry_key, ext = match.groups()
                    if sample and entry_key != key:
                        yield _sample(index, key, sample, image_column)
                        index, sample = index + 1, []
                    key = entry_key
                    sample.append((ext, tar.extractfile(member).read(), int(member.mtime)))
        except tarfile.TarError as e:
            where = f"breaks off after {index} samples" if index or sample else "is not a readable tar file"
            raise ShardError(f"{shard['source']} {where} ({e})") from None
        if sample:
            yield _sample(index, key, sample, image_column)


def _sample(index: int, key: str, entries: list[tuple[str, bytes, int]], image_ext: str | None):
    """One WebDataset sample as a shard row: the image entry's bytes, and every entry in order as
    the carry (the image's data left out)."""
    exts = [ext for ext, _, _ in entries]
    if image_ext is not None:
        at = exts.index(image_ext) if image_ext in exts else None
    else:
        at = next((i for i, ext in enumerate(exts) if "." + ext.rsplit(".", 1)[-1].lower() in FORMATS), None)
    carry = pa.table({
        "ext": exts,
        "data": pa.array([None if i == at else data for i, (_, data, _) in enumerate(entries)], pa.large_binary()),
        "mtime": [m for _, _, m in entries],
        "image": [i == at for i in range(len(entries))],
    })  # fmt: skip
    name = f"{key}.{exts[at]}" if at is not None else None
    return index, key, (entries[at][1] if at is not None else None), _ipc(carry), name


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_IPC_OPTIONS) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


# ----------------------------------------------------------------------------- writing


def staged_row(row: dict[str, Any], data: bytes | None) -> bytes:
    """What the sink stages for one finished shard row, as Arrow IPC: its key, its output bytes (its
    input bytes, when it failed), its carry and its status fields."""
    status = {
        "isosr_status": row["status"],
        "isosr_error": row.get("error"),
        "isosr_out_width": row.get("out_width"),
        "isosr_out_height": row.get("out_height"),
        "isosr_consistency_psnr": row.get("consistency_psnr"),
        "isosr_rt_psnr_model_y": row.get("rt_psnr_model_y"),
        "isosr_rt_psnr_bicubic_y": row.get("rt_psnr_bicubic_y"),
    }
    schema = pa.schema([("key", pa.string()), ("data", pa.large_binary()), ("carry", pa.large_binary()),
                        ("out_format", pa.string()), *STATUS_COLUMNS])  # fmt: skip
    own = row["key"][len(row["shard"]) + 1 :]  # the row's key in its shard: the WebDataset sample key
    values = {"key": [own], "data": [data], "carry": [row["carry"]], "out_format": [row.get("out_format")]}
    return _ipc(pa.table(values | {k: [v] for k, v in status.items()}, schema=schema))


def write_shard(fmt: str, meta: dict[str, Any], staged: list[str], rows_per_file: int) -> list[str]:
    """Write the output files of one shard from its staged rows (URIs, in row order), each whole or not
    at all, reading one staged row at a time; returns the files' URIs."""
    files = output_files(meta["output"], max(1, -(-len(staged) // rows_per_file)))
    for i, uri in enumerate(files):
        chunk = staged[i * rows_per_file : (i + 1) * rows_per_file]
        with storage.open_atomic(uri) as f:
            if fmt == PARQUET:
                _write_parquet(f, pa.ipc.read_schema(pa.py_buffer(meta["schema"])), meta.get("image_column"), chunk)
            else:
                _write_tar(f, chunk)
    return files


def _staged(uri: str) -> dict[str, Any]:
    return _from_ipc(storage.read_bytes(uri)).to_pylist()[0]


def _write_parquet(f: Any, schema: pa.Schema, image: str | None, staged: list[str]) -> None:
    """The input's schema (and metadata), STATUS_COLUMNS after its own (replacing any of that name).
    `image` is None only for a shard with no rows, which gives a file with no rows."""
    own = [field.name for field in schema if field.name not in STATUS_COLUMNS.names]
    out_schema = pa.schema([*(schema.field(n) for n in own), *STATUS_COLUMNS], metadata=schema.metadata)
    with pq.ParquetWriter(f, out_schema) as writer:
        tables, size = [], 0
        for uri in staged:
            row = _staged(uri)
            carried = _from_ipc(row["carry"]).select(own)
            at = carried.schema.get_field_index(image)
            values = carried.set_column(
                at, schema.field(image), _with_image_bytes(carried.column(image), [row["data"]])
            )
            for c in STATUS_COLUMNS:
                values = values.append_column(c, pa.array([row[c.name]], c.type))
            tables.append(values.replace_schema_metadata(schema.metadata))
            size += len(row["data"] or b"")
            if size >= ROW_GROUP_BYTES:
                writer.write_table(pa.concat_tables(tables))
                tables, size = [], 0
        if tables:
            writer.write_table(pa.concat_tables(tables))


def _write_tar(f: Any, staged: list[str]) -> None:
    """The samples in order, each with its entries in order; the image entry's extension follows the
    output format (the input's when it names the same format), and `<key>.isosr.json` holds the status."""
    with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for uri in staged:
            row = _staged(uri)
            entries = _from_ipc(row["carry"]).to_pylist()
            for entry in entries:
                ext, data = entry["ext"], entry["data"]
                if entry["image"]:
                    data = row["data"]
                    if row["isosr_status"] == OK:
                        ext = _image_ext(ext, row["out_format"])
                _add(tar, f"{row['key']}.{ext}", data or b"", entry["mtime"])
            status = {c.name.removeprefix("isosr_"): row[c.name] for c in STATUS_COLUMNS}
            _add(tar, f"{row['key']}.isosr.json", json.dumps(status, allow_nan=False).encode(),
                 max((e["mtime"] for e in entries), default=0))  # fmt: skip


def _image_ext(ext: str, fmt: str) -> str:
    """The entry's extension with its last part naming `fmt`: kept when it already does."""
    head, _, last = ext.rpartition(".")
    if names_output("." + last, fmt):
        return ext
    return (head + "." if head else "") + OUTPUT_SUFFIX[fmt].lstrip(".")


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_record(
    dst: str, meta: dict[str, Any], *, outputs: list[str], run_id: str, failed_rows: int, model: str
) -> None:
    """The shard record --skip-existing checks, written after every output file. Files of the shard's
    previous record that this one does not list (it had more rows then) are removed: a reader that
    globs DST must not find stale rows."""
    try:
        previous = json.loads(storage.read_bytes(record_uri(dst, meta["key"])))["outputs"]
    except (FileNotFoundError, KeyError, ValueError):
        previous = []
    record = {
        "key": meta["key"], "source": meta["source"], "size_bytes": meta["size_bytes"],
        "source_version": meta["source_version"], "rows": meta["rows"], "failed_rows": failed_rows,
        "outputs": outputs, "run_id": run_id, "model_sha256": model, "written": time.time(),
    }  # fmt: skip
    storage.write_atomic(record_uri(dst, meta["key"]), json.dumps(record, indent=1).encode())
    for uri in set(previous) - set(outputs):
        storage.remove(uri)


def by_input(rows: list[dict[str, Any]], listed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Manifest rows as one outcome per input of the listing, for isosr nightly: rows of loose files
    as they are; the rows of a shard as one row keyed by the shard, with its size, version and output
    from `listed` (key -> size_bytes, source_version, output): failed when the shard could not be read
    or written (its row with no row_index), ok when its output was written, whatever its rows did."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        shard = row.get("shard")
        if shard is None:
            out[row["key"]] = row
        elif row["status"] in (OK, FAILED) and shard in listed:
            whole = row.get("row_index") is None and row["status"] == FAILED
            if whole or shard not in out:
                out[shard] = {**row, **listed[shard], "key": shard, "status": FAILED if whole else OK,
                              "error": row["error"] if whole else None}  # fmt: skip
    return list(out.values())
