"""The `isosr` command.

  isosr upscale SRC DST [--address ADDR] [--checkpoint URI] [--checkpoint-sha256 HEX] [--min-workers N] [--max-workers N]
                        [--gpus-per-worker G] [--batch-size N] [--halo N] [--format F]
                        [--skip-existing | --overwrite] [--spot-check-rate R] [--max-pixels N]
                        [--skip-detail LEVELS] [--compile] [--input-format images|parquet|webdataset]
                        [--image-column NAME] [--key-column NAME] [--shard-rows N]
  isosr submit SRC DST --address http://HEAD:8265 [--wait] [--submission-id ID] [--env NAME]
                       [the upscale options but --address]
  isosr info [--checkpoint URI | --variant NAME]
  isosr demo [--out DIR] [--shards parquet|webdataset]
  isosr nightly SRC DST [--retry-failed] [--lease-ttl SECONDS] [the upscale options but
                        --skip-existing/--overwrite]

Exit status: 0 when every input succeeded, 3 when some failed (listed), 2 on a usage error, 5 when
the storage kept failing after its retries (SRC could not be listed, or the run's records not
written); isosr nightly: 4 when another nightly run holds DST's lease (nothing was done) or this
run lost it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from model.tiling import DEFAULT_BATCH_SIZE, DEFAULT_HALO, DEFAULT_SKIP_DETAIL
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.quality import DEFAULT_SPOT_CHECK_RATE
from pipeline.shards import DEFAULT_SHARD_ROWS, INPUT_FORMATS, SHARD_FORMATS

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_STORAGE = 0, 2, 3, 5
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "camera")  # scikit-image's bundled photos (camera is grey)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "tif": "TIFF",
                  "bmp": "BMP", "avif": "AVIF", "jp2": "JPEG2000", "jpeg2000": "JPEG2000"}  # fmt: skip


def _output_format(text: str) -> str:
    """--format's value as Pillow names the format (jp2 -> JPEG2000), any case."""
    if (fmt := OUTPUT_FORMATS.get(text.lower())) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of png, jpeg, webp, tiff, bmp, avif, jp2")
    return fmt


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _sha256(text: str) -> str:
    value = text.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(f"must be 64 hexadecimal digits (a sha256), got {text!r}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        metavar="URI",
        help="safetensors checkpoint: a path or any fsspec URI (s3://, https://, memory://). "
        "Default: the shipped default weights",
    )
    parser.add_argument(
        "--checkpoint-sha256",
        type=_sha256,
        metavar="HEX",
        help="refuse to run unless the checkpoint (or the default weights) has this sha256; checked where the job "
        "starts and again in every model worker (`isosr info` prints a checkpoint's digest)",
    )
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when present, else cpu)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast dtype (default auto: bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), where it is "
        "within 1-2 levels of 255 of float32; float32 on other CPUs)",
    )


def _add_run_options(parser: argparse.ArgumentParser, *, ray_address: bool = True) -> None:
    _add_model_options(parser)
    parser.add_argument(
        "--halo",
        type=int,
        default=DEFAULT_HALO,
        help=f"overlap in input pixels on each side of a tile, below half the tile (default {DEFAULT_HALO})",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive,
        help=f"tiles per forward pass (default: {DEFAULT_BATCH_SIZE} on CPU; on a GPU, as many as 60%% of its free "
        "memory holds, halved if a batch runs out of memory)",
    )
    parser.add_argument(
        "--skip-detail",
        type=_non_negative,
        default=DEFAULT_SKIP_DETAIL,
        metavar="LEVELS",
        help="tiles with at most this much detail (mean absolute difference from the 3x3 mean, in 8-bit levels) "
        f"skip the network and are upscaled bilinearly: flat sky, blank margins (default {DEFAULT_SKIP_DETAIL:g}, "
        "which lost at most 0.0015 dB on held-out photos; 0: every tile runs the network)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the network in each worker (pays off on long GPU runs)"
    )
    parser.add_argument(
        "--format",
        dest="output_format",
        type=_output_format,
        metavar="png|jpeg|webp|tiff|bmp|avif|jp2",
        help="output format (default: the input's; GIF becomes PNG, HEIC JPEG)",
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse inputs with more pixels (default {DEFAULT_MAX_PIXELS:.0e})",
    )
    if ray_address:
        parser.add_argument(
            "--address", help="an existing Ray cluster (e.g. auto, or ray://HEAD:10001); default: start a local one"
        )
    parser.add_argument(
        "--min-workers", type=_positive, help="model actors kept up (default: 1 with GPUs; CPU-only: --max-workers)"
    )
    parser.add_argument(
        "--max-workers",
        type=_positive,
        help="model actors at most (default: one per GPU up now, and required with --gpus-per-worker while no GPU "
        "is up, e.g. on an autoscaling cluster; CPU-only: one per CPU)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        help="GPUs each model actor reserves (default: 1 if the cluster has GPUs now, else 0). Given, it asks for GPU "
        "actors even before any GPU node is up, so that an autoscaling cluster adds them",
    )
    shard = parser.add_argument_group("image shards (Parquet, WebDataset)")
    shard.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        help="what SRC holds: loose image files, Parquet shards (.parquet) with a column of image bytes, or WebDataset "
        "tar shards (.tar); default: detected from what is under SRC. Shards are written back as shards of the same kind",
    )
    shard.add_argument(
        "--image-column",
        metavar="NAME",
        help="Parquet: the column of image bytes (binary, or a struct with 'bytes' as Hugging Face writes images); "
        "WebDataset: the image entry's extension, e.g. jpg. Default: the first that holds images",
    )
    shard.add_argument(
        "--key-column",
        metavar="NAME",
        help="Parquet: the column that names each row; the manifest's key is <shard>#<that name> (default: "
        "<shard>#<row index>)",
    )
    shard.add_argument(
        "--shard-rows",
        type=_positive,
        default=DEFAULT_SHARD_ROWS,
        help=f"rows per output shard file; a longer shard continues in <name>-part-00001 ... (default {DEFAULT_SHARD_ROWS})",
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--skip-existing",
        dest="skip_existing",
        action="store_true",
        default=True,
        help="leave outputs that exist (default)",
    )
    existing.add_argument("--overwrite", dest="skip_existing", action="store_false", help="redo outputs that exist")
    parser.add_argument(
        "--spot-check-rate",
        type=_rate,
        default=DEFAULT_SPOT_CHECK_RATE,
        help=f"share of inputs given the round-trip PSNR check, 0-1 (default {DEFAULT_SPOT_CHECK_RATE}; at least one per run)",
    )


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isosr", description="Upscale images x4 with the Dense-Iso-ViT transformer.")
    commands = parser.add_subparsers(dest="command", required=True)

    upscale = commands.add_parser("upscale", help="upscale an image file or a folder of images")
    upscale.add_argument(
        "src", help="an image file, or a folder or prefix searched recursively: a path or URI (s3://...)"
    )
    upscale.add_argument("dst", help="output folder or prefix; relative paths are mirrored")
    _add_run_options(upscale)

    submit = commands.add_parser("submit", help="run an upscale job on a Ray cluster through its job server")
    submit.add_argument(
        "src", help="input file, folder or prefix as the cluster sees it (s3://... for a remote cluster)"
    )
    submit.add_argument("dst", help="output folder or prefix as the cluster sees it")
    submit.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        help="the head's job server, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )
    submit.add_argument("--wait", action="store_true", help="follow the job's logs and exit with its exit status")
    submit.add_argument("--submission-id", help="run under this id (default: derived from SRC, DST and the options)")
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this environment variable to the job (e.g. AWS_ENDPOINT_URL; prefer instance roles for credentials)",
    )
    _add_run_options(submit, ray_address=False)

    info = commands.add_parser("info", help="describe the model: variant, parameters, checkpoint digest")
    _add_model_options(info)
    info.add_argument("--variant", help="describe an untrained named variant instead of a checkpoint")

    demo = commands.add_parser("demo", help="upscale scikit-image's sample photos into a local folder")
    demo.add_argument(
        "--out", type=Path, default=Path("isosr-demo"), help="folder for input/ and output/ (default ./isosr-demo)"
    )
    demo.add_argument(
        "--shards",
        choices=SHARD_FORMATS,
        help="put the photos in one image shard of this kind first (in OUT/<kind>/input/) and upscale that "
        "into OUT/<kind>/output/",
    )
    _add_run_options(demo)

    nightly = commands.add_parser(
        "nightly", help="upscale only what is new or changed since the last run (for a schedule; one run at a time)"
    )
    nightly.add_argument("src", help="folder or prefix searched recursively: a path or URI (s3://...)")
    nightly.add_argument("dst", help="output folder or prefix (local or s3://): outputs, and the state in DST/_isosr/")
    nightly.add_argument(
        "--retry-failed", action="store_true", help="retry inputs that failed before even though they have not changed"
    )
    nightly.add_argument(
        "--lease-ttl",
        type=_positive,
        metavar="SECONDS",
        help="how long the run's lease on DST lasts unless renewed (it is renewed every quarter of this); the "
        "longest a run that died blocks the next (default: pipeline.nightly.DEFAULT_LEASE_TTL_S, 300)",
    )
    _add_run_options(nightly)
    # The state decides what is processed, and a changed input's output is replaced: these do not apply.
    nightly.set_defaults(skip_existing=None)
    for action in nightly._actions:
        if action.dest == "skip_existing":
            action.help = "not for nightly (refused): its state decides what is processed"
    return parser


def _load(args: argparse.Namespace, *, variant_name: str | None = None):
    from model.inference import TileUpscaler, load_model

    source = load_model(args.checkpoint, untrained_variant=variant_name, sha256=args.checkpoint_sha256)
    return source, TileUpscaler(source.model, device=args.device, dtype=args.precision)


def cmd_info(args: argparse.Namespace) -> int:
    from model.config import variant_name
    from model.network import parameter_count

    source, runner = _load(args, variant_name=args.variant)
    config = source.model.config
    name = variant_name(config)
    params = parameter_count(source.model)
    print(f"model      Dense-Iso-ViT, variant {name}")
    print(f"parameters {params:,} ({params / 1e6:.2f} M)")
    print(
        f"scale      x{config.scale}, {config.tile_size}x{config.tile_size} tiles -> "
        f"{config.tile_size * config.scale}x{config.tile_size * config.scale}"
    )
    print(f"weights    {source.description}")
    print(f"version    {source.version}")
    print(f"device     {runner.device} ({runner.dtype})")
    print(f"config     {dataclasses.asdict(config)}")
    return EXIT_OK


def _run_options(args: argparse.Namespace, src: str, dst: str, **overrides: object):
    """RunOptions from the run options of `args` (_add_run_options)."""
    from pipeline.run import RunOptions

    values = {
        "src": src,
        "dst": dst,
        "checkpoint": args.checkpoint,
        "checkpoint_sha256": args.checkpoint_sha256,
        "address": args.address,
        "min_workers": args.min_workers,
        "max_workers": args.max_workers,
        "gpus_per_worker": args.gpus_per_worker,
        "batch_size": args.batch_size,
        "halo": args.halo,
        "output_format": args.output_format,
        "spot_check_rate": args.spot_check_rate,
        "max_pixels": args.max_pixels,
        "device": args.device,
        "precision": args.precision,
        "skip_detail": args.skip_detail,
        "compile": args.compile,
        "input_format": args.input_format,
        "image_column": args.image_column,
        "key_column": args.key_column,
        "shard_rows": args.shard_rows,
    }
    return RunOptions(**(values | overrides))


def _run(args: argparse.Namespace, src: str, dst: str) -> int:
    from pipeline.run import UsageError, run, summary_lines

    options = _run_options(args, src, dst, skip_existing=args.skip_existing)
    try:
        result = run(options)
    except (FileNotFoundError, UsageError) as e:
        print(f"isosr: {e}", file=sys.stderr)
        return EXIT_USAGE
    for line in summary_lines(result):
        print(line)
    return EXIT_SOME_FAILED if result.failed else EXIT_OK


def cmd_upscale(args: argparse.Namespace) -> int:
    return _run(args, args.src, args.dst)


def _upscale_args(args: argparse.Namespace, checkpoint: str | None) -> list[str]:
    """The upscale options of `args` as the job's command line (options left unset are omitted)."""
    values = {
        "--checkpoint": checkpoint,
        "--checkpoint-sha256": args.checkpoint_sha256,
        "--device": args.device,
        "--precision": args.precision,
        "--halo": args.halo,
        "--batch-size": args.batch_size,
        "--format": args.output_format,
        "--max-pixels": args.max_pixels,
        "--min-workers": args.min_workers,
        "--max-workers": args.max_workers,
        "--gpus-per-worker": args.gpus_per_worker,
        "--spot-check-rate": args.spot_check_rate,
        "--skip-detail": args.skip_detail,
        "--input-format": args.input_format,
        "--image-column": args.image_column,
        "--key-column": args.key_column,
        "--shard-rows": args.shard_rows,
    }
    out = [token for flag, value in values.items() if value is not None for token in (flag, str(value))]
    out += ["--compile"] if args.compile else []
    return [*out, "--skip-existing" if args.skip_existing else "--overwrite"]


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline import submit

    if not args.address:
        print(
            "isosr: submit needs the job server: --address http://HEAD:8265 (or $RAY_API_SERVER_ADDRESS)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        upscale_args = _upscale_args(args, submit.cluster_path(args.checkpoint))
        client, job = submit.submit(
            args.address,
            args.src,
            args.dst,
            upscale_args,
            sub_id=args.submission_id,
            env_vars=submit.forwarded_env(args.env),
        )
    except submit.SubmitError as e:
        print(f"isosr: {e}", file=sys.stderr)
        return EXIT_USAGE
    if job.existed:
        print(f"job {job.submission_id} was already submitted; not starting it again (pass --submission-id to rerun)")
    else:
        print(f"submitted job {job.submission_id}: {job.entrypoint}")
    if not args.wait:
        print(f"follow it with: ray job logs --follow --address {args.address} {job.submission_id}")
        return EXIT_OK
    return submit.follow(client, job.submission_id)


def write_demo_inputs(folder: Path) -> list[Path]:
    """Save scikit-image's bundled sample photos (no download) as PNG files in `folder`."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in DEMO_PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths.append(path)
    return paths


def write_demo_shard(folder: Path, kind: str) -> Path:
    """The demo photos as one image shard in `folder`: a Parquet file (name, caption, image bytes) or a
    WebDataset tar (<name>.png and <name>.txt per sample)."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    photos = write_demo_inputs(folder.parent / "photos")
    folder.mkdir(parents=True, exist_ok=True)
    names = [p.stem for p in photos]
    captions = [f"scikit-image sample photo '{n}'" for n in names]
    if kind == "parquet":
        path = folder / "photos.parquet"
        table = pa.table({"name": names, "caption": captions, "image": [p.read_bytes() for p in photos]})
        pq.write_table(table, path)
        return path
    path = folder / "photos.tar"
    with tarfile.open(path, "w") as tar:
        for name, caption, photo in zip(names, captions, photos, strict=True):
            for entry, data in ((f"{name}.png", photo.read_bytes()), (f"{name}.txt", caption.encode())):
                info = tarfile.TarInfo(entry)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    if args.shards:
        inputs, outputs = args.out / args.shards / "input", args.out / args.shards / "output"
        write_demo_shard(inputs, args.shards)
    else:
        inputs, outputs = args.out / "input", args.out / "output"
        write_demo_inputs(inputs)
    status = _run(args, str(inputs), str(outputs))
    print(f"demo: inputs in {inputs.resolve()}, x4 outputs in {outputs.resolve()}")
    return status


def cmd_nightly(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pipeline.lease import LeaseHeld, LeaseLost
    from pipeline.nightly import DEFAULT_LEASE_TTL_S, EXIT_LEASE, NightlyOptions, nightly
    from pipeline.run import UsageError, summary_lines

    if args.skip_existing is not None:
        print(
            "isosr nightly: --skip-existing and --overwrite do not apply: a nightly run processes exactly the inputs "
            "that are new or changed since they were last processed and replaces their outputs; to redo everything, "
            "run isosr upscale --overwrite",
            file=sys.stderr,
        )
        return EXIT_USAGE
    options = NightlyOptions(
        run=_run_options(args, args.src, args.dst),
        retry_failed=args.retry_failed,
        lease_ttl_s=args.lease_ttl or DEFAULT_LEASE_TTL_S,
    )
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        # systemd and Kubernetes stop with SIGTERM: unwind, so that the lease is released at once.
        on_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        outcome = nightly(options)
    except (FileNotFoundError, UsageError) as e:
        print(f"isosr nightly: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (LeaseHeld, LeaseLost) as e:
        print(f"isosr nightly: {e}", file=sys.stderr)
        return EXIT_LEASE
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, on_term)
    for line in summary_lines(outcome.result):
        print(line)
    counts = outcome.notes["counts"]
    print(
        f"nightly: new {counts['new']}, changed {counts['changed']}, model changed {counts['model_changed']}, "
        f"output changed {counts['output_changed']}, retried {counts['retried']}, unchanged {counts['unchanged']}, "
        "failed before and unchanged "
        f"{counts['failed_unchanged']}, gone {counts['gone']}"
    )
    return EXIT_SOME_FAILED if outcome.result.failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from model.checkpoint import CheckpointError

    try:
        return {
            "upscale": cmd_upscale,
            "submit": cmd_submit,
            "info": cmd_info,
            "demo": cmd_demo,
            "nightly": cmd_nightly,
        }[args.command](args)
    except CheckpointError as e:
        print(f"isosr: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # what storage raises once its retries are spent (a missing SRC is exit 2 above)
        print(
            f"isosr: storage error: {e} (after retries). Outputs already written are whole: run the same "
            "command again when the store answers, and it goes on from them",
            file=sys.stderr,
        )
        return EXIT_STORAGE


if __name__ == "__main__":
    sys.exit(main())
