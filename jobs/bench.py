"""Benchmarks, on the machine this runs on.

    python jobs/bench.py model [--variant full] [--batch-sizes 1,4,8,16] [--dtypes float32]
                               [--seconds 10] [--json PATH]

`model`: the model-only ceiling — batched forward passes over pre-made 64x64 tiles in one process:
tiles/s and output MP/s per batch size and dtype, and the model's FLOPs per tile and per output pixel
(counted by torch.utils.flop_counter, with the cost of each halo). Prints a Markdown table for
RESULTS.md; `--json` also writes the figures with the machine description and date.
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

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from model.config import variant  # noqa: E402
from model.network import DenseIsoViT, parameter_count, pick_device, precision  # noqa: E402


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
    args = parser.parse_args(argv)
    info = machine()
    result = bench_model(args)
    print(markdown(result, info))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "model": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
