"""Benchmarks, on the machine this runs on.

    python jobs/bench.py model [--variant full] [--batch-sizes 1,4,8,16] [--dtypes float32]
                               [--seconds 10] [--json PATH]
    python jobs/bench.py pipeline [--variant full] [--images 5] [--scale-images 4] [--halo 4]
                                  [--batch-size 8] [--json PATH]

`model`: the model-only ceiling — batched forward passes over pre-made 64x64 tiles in one process:
tiles/s and output MP/s per batch size and dtype, and the model's FLOPs per tile and per output pixel
(counted by torch.utils.flop_counter, with the cost of each halo). Prints a Markdown table for
RESULTS.md; `--json` also writes the figures with the machine description and date.

`pipeline`: the end-to-end pipeline (local Ray, every core) on scikit-image's photos against the
model-only ceiling on exactly the same tiles (same model, halo, batch size and cores, pre-tiled
tensors in one process); then the same run on `--scale-images` times as many photos, comparing
peak memory (PSS summed over this process and every Ray process it started, sampled every 0.2 s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import variant
from model.network import DenseIsoViT, parameter_count, pick_device, precision


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def flops_per_tile(model: DenseIsoViT, device: torch.device) -> int:
    """Forward FLOPs of one tile (multiply-add = 2 FLOPs), as torch's FLOP counter counts them."""
    tile = model.config.tile_size
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, model.config.in_channels, tile, tile, device=device))
    return counter.get_total_flops()


def time_forward(model: DenseIsoViT, device: torch.device, *, batch: int, dtype: str, seconds: float) -> float:
    """Tiles per second over about `seconds`, after one warm-up pass."""
    tile = model.config.tile_size
    x = torch.rand(batch, model.config.in_channels, tile, tile, device=device)
    done = 0
    with torch.inference_mode(), precision(device, dtype):
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        return done / (time.perf_counter() - start)


def bench_model(args: argparse.Namespace) -> dict[str, object]:
    device = pick_device(args.device)
    config = variant(args.variant)
    model = DenseIsoViT(config).to(device).eval()
    flops = flops_per_tile(model, device)
    out_pixels = (config.tile_size * config.scale) ** 2
    halos = {}
    for halo in (0, 2, 4, 8, 16):
        core = (config.tile_size - 2 * halo) * config.scale
        halos[halo] = {"compute_factor": round(out_pixels / core**2, 3), "flops_per_output_pixel": round(flops / core**2)}
    rows = []
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            tiles_per_s = time_forward(model, device, batch=batch, dtype=dtype, seconds=args.seconds)
            rows.append(
                {
                    "dtype": dtype,
                    "batch": batch,
                    "tiles_per_s": round(tiles_per_s, 2),
                    # output pixels of whole tiles, i.e. with halo 0; divide by compute_factor for a halo
                    "output_mp_per_s": round(tiles_per_s * out_pixels / 1e6, 3),
                    "gflop_per_s": round(tiles_per_s * flops / 1e9, 1),
                }
            )
            print(f"{dtype:>9} batch {batch:>3}: {rows[-1]['tiles_per_s']:8.2f} tiles/s", file=sys.stderr, flush=True)
    return {
        "variant": args.variant,
        "parameters": parameter_count(model),
        "device": str(device),
        "gflop_per_tile": round(flops / 1e9, 3),
        "halos": halos,
        "rows": rows,
    }


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def write_photos(folder: Path, count: int) -> list[Path]:
    """`count` PNG files cycling through scikit-image's bundled RGB photos (no download)."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        path = folder / f"{i:04d}-{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths.append(path)
    return paths


def model_ceiling(paths: list[Path], model: DenseIsoViT, *, halo: int, batch_size: int, dtype: str) -> dict[str, float]:
    """Output MP/s of the model alone over the photos' tiles, pre-made, in this process."""
    import numpy as np
    from PIL import Image

    from model.tiling import _planes, extract_tiles, plan_tiles

    config = model.config
    tiles, out_pixels = [], 0
    for path in paths:
        pixels = np.asarray(Image.open(path))
        plan = plan_tiles(pixels.shape[0], pixels.shape[1], tile=config.tile_size, halo=halo)
        for plane in _planes(pixels):
            tiles.append(extract_tiles(plane, plan))
        out_pixels += pixels.shape[0] * pixels.shape[1] * config.scale**2
    all_tiles = torch.from_numpy(np.concatenate(tiles))
    device = next(model.parameters()).device
    with torch.inference_mode(), precision(device, dtype):
        model(all_tiles[:batch_size].to(device))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(all_tiles), batch_size):
            model(all_tiles[i : i + batch_size].to(device))
        seconds = time.perf_counter() - start
    return {"tiles": len(all_tiles), "seconds": round(seconds, 2), "output_mp_per_s": round(out_pixels / 1e6 / seconds, 4)}


def _ceiling_share(job: tuple[str, list[str], int, int, int, str]) -> tuple[int, float]:
    """One single-threaded process's share of the tiles (every `stride`-th photo from `offset`)."""
    checkpoint, paths, offset, stride, halo, dtype = job
    from model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    model = load_checkpoint(checkpoint).model
    mine = [Path(p) for p in paths[offset::stride]]
    result = model_ceiling(mine, model, halo=halo, batch_size=8, dtype=dtype)
    return result["tiles"], result["seconds"]


def parallel_ceiling(paths: list[Path], checkpoint: str, *, halo: int, dtype: str) -> dict[str, float]:
    """The model alone in one single-threaded process per core, started together: a stricter
    ceiling than one process, where torch's threads do not scale perfectly."""
    import multiprocessing

    import numpy as np
    from PIL import Image

    cores = os.cpu_count() or 1
    jobs = [(checkpoint, [str(p) for p in paths], i, cores, halo, dtype) for i in range(cores)]
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        shares = pool.map(_ceiling_share, jobs)
    out_pixels = sum(np.asarray(Image.open(p)).shape[0] * np.asarray(Image.open(p)).shape[1] * 16 for p in paths)
    seconds = max(s for _, s in shares)
    return {"processes": cores, "tiles": sum(t for t, _ in shares), "seconds": round(seconds, 2),
            "output_mp_per_s": round(out_pixels / 1e6 / seconds, 4)}  # fmt: skip


class PeakMemory:
    """Peak PSS (bytes) of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        import psutil

        self.peak = 0
        self._stop = threading.Event()
        me = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                self.peak = max(self.peak, total)
                self._stop.wait(interval)

        self._thread = threading.Thread(target=sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pipeline_run(src: Path, dst: Path, args: argparse.Namespace, checkpoint: str, *, memory: bool) -> dict[str, float]:
    """One run of the pipeline; with `memory`, its peak PSS too. Reading PSS walks every page table
    of every Ray process (the object store maps gigabytes), which costs real CPU: runs timed for
    throughput do not sample."""
    import contextlib

    from pipeline.run import RunOptions, run

    options = RunOptions(
        src=str(src), dst=str(dst), checkpoint=checkpoint, halo=args.halo, batch_size=args.batch_size,
        precision=args.dtype, skip_existing=False,
    )  # fmt: skip
    sampler = PeakMemory(interval=0.5) if memory else None
    with sampler or contextlib.nullcontext():
        start = time.perf_counter()
        result = run(options)
        seconds = time.perf_counter() - start
    s = result.summary
    if s["counts"]["ok"] != s["counts"]["inputs"]:
        raise RuntimeError(f"pipeline benchmark: {s['failed']}")
    return {
        "images": s["counts"]["inputs"],
        "seconds": round(seconds, 2),
        "output_mp": round(s["megapixels_out"], 3),
        "output_mp_per_s": round(s["megapixels_out"] / seconds, 4),
        "peak_memory_mib": round(sampler.peak / 2**20) if sampler else None,
    }


def bench_pipeline(args: argparse.Namespace) -> dict[str, object]:
    import tempfile

    import ray

    from model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = DenseIsoViT(variant(args.variant)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = str(root / "model.safetensors")
        save_checkpoint(model, checkpoint)
        small = write_photos(root / "small", args.images)
        large = write_photos(root / "large", args.images * args.scale_images)
        ceiling = model_ceiling(small, model, halo=args.halo, batch_size=args.batch_size, dtype=args.dtype)
        print(f"model-only ceiling: {ceiling}", file=sys.stderr, flush=True)
        strict = parallel_ceiling(small, checkpoint, halo=args.halo, dtype=args.dtype)
        print(f"model-only ceiling, one single-threaded process per core: {strict}", file=sys.stderr, flush=True)
        ray.init(include_dashboard=False, logging_level="ERROR")
        try:
            end_to_end = pipeline_run(root / "small", root / "out-timed", args, checkpoint, memory=False)
            print(f"pipeline, {args.images} photos: {end_to_end}", file=sys.stderr, flush=True)
            base = pipeline_run(root / "small", root / "out-small", args, checkpoint, memory=True)
            print(f"pipeline with memory sampling, {args.images} photos: {base}", file=sys.stderr, flush=True)
            scaled = pipeline_run(root / "large", root / "out-large", args, checkpoint, memory=True)
            print(f"pipeline with memory sampling, {len(large)} photos: {scaled}", file=sys.stderr, flush=True)
        finally:
            ray.shutdown()
    return {
        "variant": args.variant,
        "halo": args.halo,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "ceiling": ceiling,
        "ceiling_per_core": strict,
        "pipeline": end_to_end,
        "pipeline_memory": base,
        "pipeline_scaled": scaled,
        "pipeline_vs_ceiling": round(end_to_end["output_mp_per_s"] / ceiling["output_mp_per_s"], 3),
        "pipeline_vs_ceiling_per_core": round(end_to_end["output_mp_per_s"] / strict["output_mp_per_s"], 3),
        "memory_growth": round(scaled["peak_memory_mib"] / base["peak_memory_mib"] - 1, 3),
    }


def pipeline_markdown(r: dict[str, object], info: dict[str, object]) -> str:
    c, p, m, q = r["ceiling"], r["pipeline"], r["pipeline_memory"], r["pipeline_scaled"]
    return "\n".join(
        [
            f"End-to-end vs model-only, variant `{r['variant']}`, halo {r['halo']}, batch {r['batch_size']}, {r['dtype']}; "
            f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}.",
            "",
            "| run | images | tiles | seconds | output MP/s | peak memory |",
            "|---|---:|---:|---:|---:|---:|",
            f"| model only (pre-tiled, one process) | {p['images']} | {c['tiles']} | {c['seconds']} | {c['output_mp_per_s']} | |",
            f"| model only (pre-tiled, {r['ceiling_per_core']['processes']} single-threaded processes) | {p['images']} | "
            f"{r['ceiling_per_core']['tiles']} | {r['ceiling_per_core']['seconds']} | {r['ceiling_per_core']['output_mp_per_s']} | |",
            f"| pipeline | {p['images']} | | {p['seconds']} | {p['output_mp_per_s']} | |",
            f"| pipeline, sampling memory | {m['images']} | | {m['seconds']} | {m['output_mp_per_s']} | {m['peak_memory_mib']} MiB |",
            f"| pipeline, sampling memory, {q['images'] // p['images']}x the images | {q['images']} | | {q['seconds']} | "
            f"{q['output_mp_per_s']} | {q['peak_memory_mib']} MiB |",
            "",
            f"Pipeline / ceiling: **{r['pipeline_vs_ceiling']:.1%}** (one process), "
            f"{r['pipeline_vs_ceiling_per_core']:.1%} (one single-threaded process per core); peak memory growth for "
            f"{q['images'] // p['images']}x the images: **{r['memory_growth']:+.1%}**.",
        ]
    )


def markdown(result: dict[str, object], info: dict[str, object]) -> str:
    lines = [
        f"Model-only forward, variant `{result['variant']}` ({result['parameters']:,} parameters), "
        f"{result['gflop_per_tile']} GFLOP per 64x64 tile; {info['cpu']}, {info['cores']} cores, "
        f"torch {info['torch']} ({info['torch_threads']} threads), {result['device']}, {info['date']}.",
        "",
        "| dtype | batch | tiles/s | output MP/s (halo 0) | GFLOP/s |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['dtype']} | {r['batch']} | {r['tiles_per_s']} | {r['output_mp_per_s']} | {r['gflop_per_s']} |"
        for r in result["rows"]
    ]
    lines += ["", "| halo | compute factor | FLOPs per output pixel |", "|---:|---:|---:|"]
    lines += [f"| {h} | {v['compute_factor']} | {v['flops_per_output_pixel']:,} |" for h, v in result["halos"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = parser.add_subparsers(dest="section", required=True)
    model = sections.add_parser("model", help="model-only ceiling")
    model.add_argument("--variant", default="full")
    model.add_argument("--batch-sizes", default="1,4,8,16")
    model.add_argument("--dtypes", default="float32")
    model.add_argument("--seconds", type=float, default=10.0, help="timed seconds per row")
    model.add_argument("--device")
    model.add_argument("--json", type=Path, help="also write the figures here")
    pipe = sections.add_parser("pipeline", help="end-to-end pipeline vs the model-only ceiling, and memory")
    pipe.add_argument("--variant", default="full")
    pipe.add_argument("--images", type=int, default=5)
    pipe.add_argument("--scale-images", type=int, default=4, help="the memory run uses this many times the images")
    pipe.add_argument("--halo", type=int, default=4)
    pipe.add_argument("--batch-size", type=int, default=8)
    pipe.add_argument("--dtype", default="float32")
    pipe.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    info = machine()
    if args.section == "model":
        result = bench_model(args)
        print(markdown(result, info))
    else:
        result = bench_pipeline(args)
        print(pipeline_markdown(result, info))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, args.section: result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
