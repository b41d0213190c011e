"""One upscale run: list SRC, build the Ray Data pipeline, write outputs, manifest and reports.

    list -> read + decode + cut into pieces (CPU tasks) -> model actors (ActorPoolStrategy, GPU
    when there is one) -> quality checks + encode (CPU tasks) -> ImageSink (writes) -> manifest

The stages stream: no groupby or shuffle, so the first outputs are written while later inputs are
still being read, and memory is bounded by the pipeline's depth, not the dataset's size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from model.tiling import DEFAULT_HALO, DEFAULT_SKIP_DETAIL
from pipeline import quality, shards, storage
from pipeline.assembly import Assembler, RunPaths, assembled_rows
from pipeline.images import DEFAULT_MAX_PIXELS, file_too_large, output_format, output_suffix
from pipeline.manifest import FAILED, OK, SKIPPED, table
from pipeline.report import Crop, Thresholds, render_html, summarize
from pipeline.sink import ImageSink
from pipeline.stages import MODEL_ENV, TileWorker, decode_stage, finish_stage

if TYPE_CHECKING:
    from model.inference import ModelSource

MAX_REPORT_CROPS = 12
FINISH_CPUS = 0.5  # quality checks + encoding (and the writes fused with them), per task
ROW_BLOCK_BYTES = 1  # Ray Data blocks: each a batch a stage returned or yielded (see build_dataset)
READ_AHEAD_PER_ACTOR = 4  # shard rows read and not yet staged, per model actor (Assembler.may_read)
LAST_ROUND_BANDS = 4  # bands of each image in a run's last round on CPU actors (spread_last)
GPU_CALLS_PER_ACTOR = 4  # pieces a GPU actor works on at once, in threads (build_dataset)
DECODE_TASKS_PER_ACTOR = 2  # decoding tasks at once, per model actor (build_dataset)
OBJECT_STORE_MIN, OBJECT_STORE_PER_ACTOR = 2**30, 512 * 2**20  # the run's object-store budget (build_dataset)


class UsageError(ValueError):
    """Options that cannot work together or with this model; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    src: str
    dst: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None  # the digest the checkpoint must have; checked in the driver and every actor
    address: str | None = None  # an existing Ray cluster; None starts (and stops) a local one
    min_workers: int | None = None  # default: 1 with GPUs; on a CPU-only cluster, max_workers
    max_workers: int | None = None  # default: one per GPU up now; on a CPU-only cluster, one per CPU
    gpus_per_worker: float | None = None  # default: 1 when GPUs are up now, else 0; see place()
    batch_size: int | None = None  # tiles per forward pass; None: 8 on CPU, from free memory on a GPU
    halo: int = DEFAULT_HALO
    output_format: str | None = None
    skip_existing: bool = True
    spot_check_rate: float = quality.DEFAULT_SPOT_CHECK_RATE
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_tiles: int = 1024  # an image with more tiles is cut into bands spread over the actors
    device: str | None = None
    precision: str = "auto"
    skip_detail: float = DEFAULT_SKIP_DETAIL  # tiles with less detail skip the network; 0: none do
    compile: bool = False  # torch.compile the network in each actor
    input_format: str | None = None  # images | parquet | webdataset; None: detected from SRC (resolve_inputs)
    image_column: str | None = None  # shards: the column (Parquet) or extension (WebDataset) of the image
    key_column: str | None = None  # Parquet: the column of row keys (manifest key "<shard>#<row key>"); None: row index
    shard_rows: int = shards.DEFAULT_SHARD_ROWS  # rows per output shard file
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class Placement:
    """How the model stage sits on the cluster."""

    gpus: float  # per actor
    cpus: float  # logical CPUs per actor
    threads: int | None  # torch threads per actor (None: torch's default)
    workers: tuple[int, int]  # (min, max) actors


def place(options: RunOptions, resources: dict[str, float], *, fixed: bool = False) -> Placement:
    """Where the model actors go, given the cluster's resources now. `fixed`: the cluster cannot add
    nodes (the local Ray that run() starts itself).

    GPU actors, each holding one CPU beside its GPUs, when --gpus-per-worker is above 0 or, left out,
    when the cluster has GPUs now. An explicit --gpus-per-worker asks for GPU actors even while no GPU
    is up: on an autoscaling cluster whose GPU workers start from zero (cluster.yaml), the waiting
    actors are what makes the autoscaler add GPU nodes. --max-workers bounds them; without it, one
    actor per GPU up now, and with no GPU up nothing says how far the cluster may grow, so it is
    then required. --min-workers defaults to 1 (a Ray Data actor pool keeps at least one).

    CPU-only: one single-threaded actor per CPU, each accounted as half a CPU so that decoding and
    encoding tasks keep room beside them (on the 2-core machine the model alone does 4–7 % more in two
    single-threaded processes than in one with two threads: torch's threads scale poorly at this
    size; RESULTS.md).

    Raises UsageError, naming the option to change, for GPU actors with no way to get a GPU, model
    actors that would leave no CPU for the other stages, and inconsistent worker counts."""
    gpus_up, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if options.gpus_per_worker is not None and options.gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker must be 0 or more, got {options.gpus_per_worker:g}")
    if options.min_workers and options.max_workers and options.min_workers > options.max_workers:
        raise UsageError(
            f"--min-workers {options.min_workers} is above --max-workers {options.max_workers}; lower one or raise the other"
        )
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus_up else 0.0)
    if gpus:
        fit_now = int(gpus_up // gpus)  # actors the GPUs up now can hold
        if not fit_now and fixed:
            raise UsageError(
                f"--gpus-per-worker {gpus:g} asks for GPU actors, but the local Ray that isosr starts has {gpus_up:g} "
                "GPUs (the CUDA devices torch sees here) and cannot add any: leave out --gpus-per-worker to run on "
                "the CPUs, or pass --address of a cluster that has or can add GPU workers"
            )
        if not options.max_workers and not fit_now:
            raise UsageError(
                f"--gpus-per-worker {gpus:g} asks for GPU actors, but the cluster has {gpus_up:g} GPUs up now, so "
                "nothing says how far it may grow: pass --max-workers N too, the most GPU actors to run (on an "
                "autoscaling cluster, as many as its GPU workers can hold: 8 with cluster.yaml)"
            )
        top = options.max_workers or fit_now
        placement = Placement(gpus, 1.0, None, (min(options.min_workers or 1, top), top))
        # The CPU of an actor still waiting for its GPU node comes with that node: only actors that
        # the GPUs up now can hold must find their CPUs in the cluster as it is.
        needs_room_now = placement.workers[0] <= fit_now
    else:
        if not cpus:
            raise UsageError(
                "the cluster has no CPU and no GPU up now, so the model has nowhere to run: on an autoscaling "
                "cluster whose workers start from zero (cluster.yaml), pass --gpus-per-worker 1 --max-workers N "
                "so that GPU actors are asked for and GPU nodes added"
            )
        top = options.max_workers or max(1, int(cpus))
        placement = Placement(0.0, 0.5, 1, (min(options.min_workers or top, top), top))
        needs_room_now = True
    if needs_room_now and placement.workers[0] * placement.cpus + 0.5 > cpus:
        raise UsageError(
            f"{placement.workers[0]} model actors would hold all {cpus:g} CPUs of the cluster, leaving none for "
            "decoding and encoding; lower --min-workers"
        )
    return placement


@dataclass
class RunResult:
    run_id: str
    manifest: pa.Table
    summary: dict[str, Any]
    run_dir: str

    @property
    def failed(self) -> list[dict[str, Any]]:
        return self.summary["failed"]


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def resolve_inputs(options: RunOptions, *, log: TextIO | None = None) -> tuple[RunOptions, list[storage.InputFile]]:
    """SRC's listing, and the options with its input format settled (detected when not given); the
    files under SRC that are not inputs (their suffix), counted by suffix on `log`. Raises
    FileNotFoundError for a missing SRC and UsageError for a SRC that mixes kinds of input."""
    ignored: Counter[str] = Counter()
    try:
        fmt, inputs = shards.list_src(options.src, options.dst, options.input_format, ignored=ignored)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if ignored and log is not None:
        print(f"isosr: {_left_alone(ignored, fmt)}", file=log)
    return dataclasses.replace(options, input_format=fmt), inputs


def _left_alone(ignored: Counter[str], fmt: str) -> str:
    """What a run says of the files under SRC that it does not read, by suffix, most first."""
    total = sum(ignored.values())
    kinds = ", ".join(f"{count:,} {suffix or 'without a suffix'}" for suffix, count in ignored.most_common(5))
    more = f" and {len(ignored) - 5} more kinds" if len(ignored) > 5 else ""
    what = "image files of a format isosr reads" if fmt == shards.IMAGES else f"{fmt} shards"
    return f"{total:,} files under SRC are not {what} and are left alone ({kinds}{more})"


def plan_inputs(
    options: RunOptions,
    run_id: str,
    *,
    inputs: list[storage.InputFile] | None = None,
    only: set[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows to process, manifest rows settled without processing: skipped, or failed because another
    input already claims the same output) for every input under SRC: image files, or image shards
    when options.input_format says so (settled by resolve_inputs).

    `inputs`: SRC's listing, when the caller has it (default: list SRC). `only`: plan just these keys
    (isosr nightly: the new and changed ones); the outputs of the other inputs still count as claimed,
    first, so that a new input never takes over the output of one processed before."""
    if inputs is None:
        options, inputs = resolve_inputs(options)
    sharded = options.input_format in shards.SHARD_FORMATS
    existing = storage.list_files(options.dst) if options.skip_existing else set()
    todo, settled = [], []
    claimed: dict[str, str] = {}  # output path -> the key that writes it
    if only is not None:
        for f in inputs:
            if f.key not in only and f.error is None:
                claimed.setdefault(storage.filesystem(output_of(options, f.key)[1])[1], f.key)
        inputs = [f for f in inputs if f.key in only]
    for f in inputs:
        fmt, out = output_of(options, f.key) if f.error is None else (None, None)
        row = {
            "source": f.uri,
            "key": f.key,
            "size_bytes": f.size,
            "source_version": f.version,
            "output": out,
            "out_format": fmt,
            "shard": f.key if sharded else None,
        }
        # Known from the listing (a name that is not UTF-8, a folder that cannot be listed, a file too
        # large for an image): nothing is read.
        error = f.error or (None if sharded else file_too_large(f.size, options.max_pixels))
        if error:
            settled.append({**row, "output": None, "run_id": run_id, "status": FAILED, "error": error})
            continue
        path = storage.filesystem(out)[1]
        record = shards.finished_record(options.dst, f, existing) if sharded and options.skip_existing else None
        if record is not None:
            settled.append(shards.skipped_row(f, record, run_id))
        elif path in claimed:  # e.g. x.gif and x.png both become x.png; x.jpg and x.png with --format png
            error = f"its output {out} is already the output of {claimed[path]}; rename one of them"
            settled.append({**row, "run_id": run_id, "status": FAILED, "error": error})
        elif path in existing and not sharded:  # a shard's output is judged by its record, above
            settled.append(
                {**row, "run_id": run_id, "status": SKIPPED, "error": "output exists (use --overwrite to redo)"}
            )
        else:
            todo.append(row)
        claimed.setdefault(path, f.key)
    # A shard's rows are sampled as they are read; here one shard is chosen whose first row is checked
    # in any case, so that a run has at least one spot check.
    sample = quality.choose_sample([r["key"] for r in todo], 0.0 if sharded else options.spot_check_rate)
    for row in todo:
        row["spot_check"] = row["key"] in sample
    # Largest first: the last inputs to finish are then small ones, so no actor sits idle for long
    # while another finishes a big image at the end of the run.
    todo.sort(key=lambda r: -r["size_bytes"])
    return todo, settled


def output_of(options: RunOptions, key: str) -> tuple[str | None, str]:
    """(output format, output URI) of the input at `key`; a shard's first output file has its
    relative name, and its rows' format is each image's own (None here) unless --format says."""
    if options.input_format in shards.SHARD_FORMATS:
        return options.output_format, storage.join(options.dst, key)
    fmt = output_format(key, options.output_format)
    return fmt, storage.join(options.dst, storage.with_suffix(key, output_suffix(key, fmt)))


def build_dataset(
    rows: list[dict[str, Any]],
    options: RunOptions,
    *,
    tile: int,
    scale: int,
    placement: Placement,
    assembler: Any = None,
):
    """All map_batches wiring in one place: resources are set here, where the pipeline is assembled.
    `assembler`: the run's Assembler, which the readers of image shards tell how many rows they read."""
    sharded = options.input_format in shards.SHARD_FORMATS
    # Not on GPU actors, where a piece takes milliseconds, less than staging its bands; not for shards, of many rows.
    if not (placement.gpus or sharded):
        rows = spread_last(rows, placement.workers[1])
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    # The dataset's own context (a copy, so the caller's is left alone), which every stage below shares:
    # - Ray Data packs a task's outputs into blocks of up to target_max_block_size (128 MiB) before
    #   handing them on, so a shard's reader would pass ~10 rows per block and each later stage hold
    #   them all at once (measured: 1.2 GB per model actor for 512x512 rows, ~0.5 GB with one row per
    #   block). A limit of 1 byte makes each batch a stage returns or yields a block of its own: a
    #   shard's reader, which waits for its rows to be staged (Assembler.may_read), must not wait
    #   for a row that Ray Data still holds back to fill a block.
    # - Its object-store budget defaults to the whole store (30 % of RAM), which it fills with rows
    #   waiting for the slowest stage whenever a faster one runs ahead (measured: 4.2 GB of live
    #   objects during a 1 GB shard). A queue of a few rows per model actor keeps every stage busy.
    ds.context.target_max_block_size = ROW_BLOCK_BYTES
    ds.context.execution_options.resource_limits = ds.context.execution_options.resource_limits.copy(
        object_store_memory=max(OBJECT_STORE_MIN, OBJECT_STORE_PER_ACTOR * placement.workers[1])
    )
    decode = {
        "tile": tile,
        "scale": scale,
        "halo": options.halo,
        "max_tiles": options.max_tiles,
        "max_pixels": options.max_pixels,
    }
    # A quarter CPU: decoding is light. Resources unlike the model actor's (which holds 1 or 0.5) also
    # keep Ray from fusing decoding into the actor, which would pin an image's bands to it.
    # At most DECODE_TASKS_PER_ACTOR at once: a node's free quarter CPUs would otherwise let Ray Data
    # start dozens (60 on 16 cores beside one GPU actor), each in a worker process that Ray starts and
    # that imports Ray Data and isosr (~1.5 CPU-s) while the model actors load: with Ray told of 16
    # CPUs on 2 cores, a 48-photo run started 30 processes and the model actor's start took 26 s
    # instead of 3 (RESULTS.md). Two are far ahead of a model actor: the bench's 8 photos decode in 0.08 CPU-s.
    decoders = ray.data.TaskPoolStrategy(size=DECODE_TASKS_PER_ACTOR * placement.workers[1])
    stage, compute, cpus, kwargs, where = decode_stage, decoders, 0.25, decode, None
    if sharded:
        # A generator: each shard streams out row by row, staying a few rows ahead of the rows staged
        # (Assembler.may_read), so a reader lasts as long as its shard and waits most of that time.
        # No CPU for it, at most one per model actor: Ray Data reserves CPU for each running stage out
        # of what the cluster can give it now, and on a small node a reader's share left too little
        # for the finishing stage, which then never ran while the reader waited for it (a hang).
        # (No more readers than shards either: Ray Data warns about a pool larger than its inputs.)
        # Holding no CPU, a reader could land on a node that offers none, kept free of pipeline work
        # (cluster.yaml's head, which runs the driver), and decode a whole shard there: kept off those.
        readers = min(placement.workers[1], len(rows))
        stage, compute, cpus = shards.read_stage, ray.data.TaskPoolStrategy(size=readers), 0
        where = off_cpu_less_nodes(ray.nodes())
        kwargs = {
            "fmt": options.input_format, "image_column": options.image_column, "key_column": options.key_column,
            "output_format": options.output_format, "spot_check_rate": options.spot_check_rate,
            "assembler": assembler, "decode": decode,
        }  # fmt: skip
    ds = ds.map_batches(
        stage,
        batch_size=1,
        batch_format="pyarrow",
        compute=compute,
        num_cpus=cpus,
        fn_kwargs=kwargs,
        label_selector=where,
    )
    ds = ds.map_batches(
        TileWorker,
        batch_size=1,  # pieces per call; tiles of a call's pieces share forward batches
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=placement.workers[0],
            max_size=placement.workers[1],
            # Ray Data queues 2 pieces on each actor by default. A piece takes a CPU actor seconds
            # to minutes: one queued behind a busy actor leaves another idle at the end (measured on
            # photos of mixed sizes: runs 5-9 s longer), against the ~0.13 s an actor waits for its
            # next piece (Ray Data's executor polls its tasks every 0.1 s: 0.75-0.93 s a bench run;
            # RESULTS.md), so CPU actors take one at a time. A GPU actor keeps the next piece queued
            # to hide its transfer.
            max_tasks_in_flight_per_actor=1 if not placement.gpus else None,
            # A GPU actor runs calls in threads, forward passes one at a time (stages._OneAtATime):
            # its GPU takes a piece's tiles in milliseconds, while cutting them and blending the
            # outputs on one CPU took ~0.3 s a 512x512 photo on an H200 (RESULTS.md).
            max_concurrent_calls_per_actor=GPU_CALLS_PER_ACTOR if placement.gpus else None,
            enable_true_multi_threading=True if placement.gpus else None,
        ),
        num_gpus=placement.gpus,
        num_cpus=placement.cpus,
        # The actors' malloc, which Arrow uses too, keeps a forward batch's activations (on a CPU) and a
        # piece's canvases for the next (stages.MODEL_ENV); Ray merges these env_vars with a job's own.
        runtime_env={"env_vars": MODEL_ENV},
        fn_constructor_kwargs={
            "threads": placement.threads,
            "checkpoint": options.checkpoint,
            "checkpoint_sha256": options.checkpoint_sha256,
            "device": options.device,
            "precision": options.precision,
            "batch_size": options.batch_size,
            "halo": options.halo,
            "skip_detail": options.skip_detail,
            "compile": options.compile,
        },
    )
    return ds.map_batches(
        finish_stage, batch_size=1, batch_format="pyarrow", num_cpus=FINISH_CPUS, fn_kwargs={"scale": scale}
    )


def spread_last(rows: list[dict[str, Any]], actors: int) -> list[dict[str, Any]]:
    """`rows` (largest file first) with the pieces decoding cuts each image into (`spread`, decode_row's),
    so that the CPU model actors end together instead of one running an image while the others wait:
    - the images left after the last full round of one an actor, the smallest, are each cut into
      bands, where tall enough, that together keep every actor busy (three images on two actors: the
      third in two bands; seventeen on sixteen: the last in sixteen);
    - the last round's images (the last `actors` of them) are each cut into LAST_ROUND_BANDS (or the
      rule above's number, the larger): the actors reach that round at different times, and one that
      ends early then takes part of an image instead of waiting for the others' whole ones, so that
      the last actor ends about a band after the first (eight images on two actors: the last two in
      four each).
    `spread` is what decoding asks for: an image gets fewer bands where it is short, since a band is
    two tile rows at least (split_rows; an image of 7 tile rows, 3 bands). A cut runs no tile twice;
    the bands are stacked by one more task, which encodes the image. One actor: nothing is cut."""
    if actors < 2:
        return [{**row, "spread": 1} for row in rows]
    left = len(rows) % actors
    each = -(-actors // left) if left else 1

    def spread(i: int) -> int:
        if i >= len(rows) - left:
            return max(each, LAST_ROUND_BANDS)
        return LAST_ROUND_BANDS if i >= len(rows) - actors else 1

    return [{**row, "spread": spread(i)} for i, row in enumerate(rows)]


def off_cpu_less_nodes(nodes: list[dict[str, Any]]) -> dict[str, str] | None:
    """A Ray label selector for any node but the live ones, of `nodes` as ray.nodes() lists them, that
    offer no CPU (None: there are none)."""
    ids = [n["NodeID"] for n in nodes if n["Alive"] and not n["Resources"].get("CPU")]
    return {"ray.io/node-id": f"!in({', '.join(ids)})"} if ids else None


def _cluster_address(options: RunOptions) -> str | None:
    """The cluster to run on; None: a local Ray. RAY_ADDRESS is set for Ray jobs: run on their cluster."""
    return options.address or os.environ.get("RAY_ADDRESS")


def _ray_init(options: RunOptions) -> bool:
    """Connect to the cluster (or start a local one); True when this call did either, so that the run
    disconnects (or stops its local Ray) at the end."""
    if ray.is_initialized():
        return False
    # Credentials are never forwarded: a local Ray's workers inherit this environment, and a
    # cluster's workers use their own (instance roles), so no secret lands in a runtime env.
    address = _cluster_address(options)
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        import torch

        ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, logging_level="WARNING")
    return True


def run(options: RunOptions, *, log: TextIO | None = None) -> RunResult:
    """Upscale everything under options.src into options.dst. Raises FileNotFoundError for a
    missing SRC, CheckpointError for an unusable checkpoint and UsageError for bad options, before
    any work starts."""
    log = log or sys.stderr
    started = time.perf_counter()
    source = prepare(options)
    run_id = new_run_id()
    options, inputs = resolve_inputs(options, log=log)
    todo, settled = plan_inputs(options, run_id, inputs=inputs)
    print(
        f"isosr: run {run_id}: {len(todo)} inputs to upscale, {len(settled)} settled before starting (outputs exist, or clash)",
        file=log,
    )
    return execute(options, source=source, run_id=run_id, todo=todo, settled=settled, started=started, log=log)


def prepare(options: RunOptions) -> ModelSource:
    """The model, loaded in the driver so that a bad checkpoint fails before any work, and the options
    checked against it. Raises CheckpointError and UsageError."""
    from model.inference import load_model
    from model.tiling import check_halo

    source = load_model(options.checkpoint, sha256=options.checkpoint_sha256)
    try:
        check_halo(options.halo, source.model.config.tile_size)
    except ValueError as e:
        raise UsageError(f"--halo: {e}") from None
    for name, uri in (("SRC", options.src), ("DST", options.dst)):
        if storage.printable(uri) != uri:
            raise UsageError(
                f"{name} {storage.printable(uri)} is not valid UTF-8 (\\xNN: the bytes that are not); rename it"
            )
    if storage.same_place(options.src, options.dst):
        raise UsageError(f"SRC and DST are the same place ({options.src}); write the outputs somewhere else")
    return source


def execute(
    options: RunOptions,
    *,
    source: ModelSource,
    run_id: str,
    todo: list[dict[str, Any]],
    settled: list[dict[str, Any]],
    started: float,
    log: TextIO,
    notes: dict[str, Any] | None = None,
) -> RunResult:
    """Upscale the planned rows `todo` (as plan_inputs makes them), put them and the `settled` rows in
    the manifest, and write the run's files; `notes` are added to report.json (isosr nightly's
    counts). Ray is started, when run() must start it, only if `todo` is not empty."""
    config = source.model.config
    paths = RunPaths(dst=options.dst, run_id=run_id)
    print(f"isosr: {source.description}, version {source.version}", file=log)
    rows: list[dict[str, Any]] = []
    started_ray = _ray_init(options) if todo else False
    assembler = None
    try:
        if todo:
            # Only a local Ray that this run started itself is known not to grow.
            fixed = started_ray and not _cluster_address(options)
            placement = place(options, ray.cluster_resources(), fixed=fixed)
            # On the driver's node, so that the run's bookkeeping lives and dies with the driver: left to
            # Ray's scheduler it may land on a worker node, and losing that node ended the run with a
            # traceback, every output written and no manifest (tests/test_faults.py, node lost).
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            assembler = Assembler.options(scheduling_strategy=here).remote(
                paths=paths,
                thresholds=options.thresholds,
                input_format=options.input_format,
                shard_rows=options.shard_rows,
                read_ahead=READ_AHEAD_PER_ACTOR * placement.workers[1],
            )
            sink = ImageSink(paths=paths, thresholds=options.thresholds, assembler=assembler)
            ds = build_dataset(
                todo, options, tile=config.tile_size, scale=config.scale, placement=placement, assembler=assembler
            )
            # Writes ask what the encode stage asks, so Ray fuses the two: no extra hand-off of the
            # encoded bytes through the object store.
            ds.write_datasink(sink, ray_remote_args={"num_cpus": FINISH_CPUS})
            rows = sink.rows + assembled_rows(assembler)
            lost = ray.get(assembler.unfinished.remote())
            if lost:  # never expected: Ray Data re-runs lost tasks; a row said so beats a row missing
                raise RuntimeError(f"shards not completed although the pipeline finished: {lost}")
    finally:
        # Nothing of the run outlives it: on a cluster that stays up, an actor left behind would keep
        # its node from going idle and being given back. (Ray Data ends its model actors itself.)
        if assembler is not None:
            ray.kill(assembler)
        if started_ray:
            ray.shutdown()
    storage.remove(f"{paths.run_dir}/staging")  # every band is assembled: its folders, left empty, go too
    for row in settled:
        row["model_sha256"] = source.version
    manifest = table(rows + settled)
    manifest = manifest.sort_by("key")
    seconds = time.perf_counter() - started
    summary = summarize(manifest, run_id=run_id, seconds=seconds, thresholds=options.thresholds)
    summary.update(notes or {})
    write_run_files(paths, manifest, summary)
    return RunResult(run_id, manifest, summary, paths.run_dir)


def write_run_files(paths: RunPaths, manifest: pa.Table, summary: dict[str, Any]) -> None:
    """manifest.parquet, report.json and report.html in the run's folder."""
    buffer = pa.BufferOutputStream()
    pq.write_table(manifest, buffer)
    storage.write_atomic(f"{paths.run_dir}/manifest.parquet", buffer.getvalue().to_pybytes())
    storage.write_atomic(f"{paths.run_dir}/report.json", json.dumps(summary, indent=2, allow_nan=False).encode())
    crops = []
    for row in manifest.filter(pc.equal(manifest["spot_check"], True)).to_pylist()[:MAX_REPORT_CROPS]:
        if row["status"] == OK and storage.exists(paths.crop(row["key"], "before")):
            crops.append(
                Crop(
                    row["key"],
                    storage.read_bytes(paths.crop(row["key"], "before")),
                    storage.read_bytes(paths.crop(row["key"], "after")),
                )
            )
    storage.write_atomic(f"{paths.run_dir}/report.html", render_html(summary, manifest, crops).encode())


def summary_lines(result: RunResult) -> list[str]:
    """The end-of-run summary a user reads: counts, megapixels, throughput, PSNR figures, flags."""
    s = result.summary
    c = s["counts"]
    rate = s["output_mp_per_s"] or 0.0
    lines = [
        f"inputs {c['inputs']}, ok {c['ok']}, failed {c['failed']}, skipped {c['skipped']}",
        f"{s['megapixels_in']:.2f} MP in -> {s['megapixels_out']:.2f} MP out in {s['seconds']:.1f} s ({rate:.2f} output MP/s)",
    ]
    if s["tiles"]["skipped"]:
        lines.append(
            f"tiles: {s['tiles']['total']:,}, of them {s['tiles']['skipped']:,} flat ones upscaled without the network"
        )
    cp = s["consistency_psnr"]
    if cp["n"]:
        lines.append(f"consistency PSNR: min {_db(cp['min'])}, median {_db(cp['median'])} over {cp['n']} images")
    rt = s["round_trip"]
    if rt["n"]:
        lines.append(
            f"round trip ({rt['n']} spot-checked): model {_db(rt['mean_model_y'])}, bicubic {_db(rt['mean_bicubic_y'])} "
            f"(Y), gain {_db(rt['mean_gain_db'])}"
        )
    lines += [f"FLAG (job): {flag}" for flag in s["job_flags"]]
    lines += [f"FLAG {_one_line(img['key'])}: {img['flags']}" for img in s["flagged_images"]]
    lines += [f"FAILED {_one_line(f['key'])}: {f['error']}" for f in s["failed"]]
    lines.append(f"manifest and report: {result.run_dir}/")
    return lines


def _one_line(key: str) -> str:
    """`key` with control characters (a newline or a tab is allowed in a file name) escaped as Python
    writes them, so that each FLAG or FAILED line is one line (the manifest keeps the key itself)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in key)


def _db(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} dB"
