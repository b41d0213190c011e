"""Benchmarks of every stage, on the machine this runs on (locally, or as a Ray job: `isosr submit`
is not needed, `ray job submit -- python jobs/bench.py ...` runs it on a cluster's head).

    python jobs/bench.py [--quick] [--json PATH] [--markdown PATH] [--sections model,codecs,...]
                         [--variant full] [--images N] [--photos DIR]

Sections (all by default):
  model     the model-only ceiling: forward passes over pre-made tiles in one process, tiles/s and
            output MP/s by batch size and dtype; FLOPs per tile (torch's FLOP counter) and per output
            pixel for each halo; on a GPU, the share of its bf16 peak (MFU).
  codecs    decode and encode throughput per core (one thread) of PNG, JPEG and WebP, on a photo
            upscaled to an output's size, at the settings isosr writes and the alternatives.
  halo      halo vs cost vs seams, with the shipped weights on real photos: compute factor, PSNR-Y
            against the original, and the error next to tile boundaries against elsewhere.
  precision bf16 autocast against float32 with the shipped weights on real photos: PSNR-Y of
            each, the largest pixel difference and the share of pixels that differ.
  skip      content-adaptive skipping: share of tiles skipped, model time and PSNR-Y lost, by
            --skip-detail level, with the shipped weights on real photos.
  pipeline  the end-to-end pipeline (`isosr upscale`'s code on a local Ray, every core) on a fixed set
            of real photos against (a) the model-only ceiling on exactly the same tiles, laid out as
            the pipeline's model actors are (on a CPU one single-threaded process per core, on a GPU
            one process), measured before and after the pipeline runs (their mean: the machine's
            speed drifts), and (b) the
            naive baseline on the same inputs: one process, tiles one at a time (batch 1), Pillow
            reading and writing, as Real-ESRGAN's tiler works. Top-level JSON keys
            `pipeline_vs_ceiling` and `pipeline_vs_naive` are the ratios of output MP/s. Each
            pipeline run is also split, from Ray's task events of its model actors, into the time
            until their first piece (before their `__init__`, in it, after it), running pieces (at
            the ceiling's rate, and beyond it), waiting between pieces, the tail and the time after
            the last piece, with the share of the cores busy and the binding stage (`time_split`,
            `cores_busy`, `binding_stage`).
            Without --quick also the memory runs: peak memory with --scale-images times the photos.
  profile   (only when named) where the model's time goes at one batch (the largest of
            --batch-sizes) and precision (the last of --dtypes): the forward pass, the transformer
            body and the convolutional head timed apart with their own FLOPs (and MFU), with
            --compile compiled too, and torch.profiler's kernels that take the most time.
  actor     (only when named) a model actor's own CPU work a photo, beside the network: the model
            stage (pipeline.stages.TileWorker, as a GPU actor runs it: batch 1024, --skip-detail 0.5)
            on the decoded photos, with the network standing in at no cost (on a GPU its outputs
            land in a cached pinned buffer while the CPU waits), calls one at a time and
            GPU_CALLS_PER_ACTOR at once in threads, each in a fresh process with glibc's and
            Arrow's allocators as they come and with the actors' settings (pipeline.stages.MODEL_ENV):
            wall and CPU milliseconds and page faults a photo. On a GPU node this work binds.
  startup   (only when named) a run's start on a node of many CPUs beside one model actor, as on a
            GPU node: a local Ray told of STARTUP_CPUS CPUs and 1 GPU, the model actor on this
            machine's CPU with every tile on the skip path (the network's work is not what is
            measured; the actor still loads --variant), --images photos (default 48), one fresh Ray
            per run: the run's seconds, the time until the model actor's first piece (before its
            `__init__`, in it) and the worker processes Ray started during the run.
  cpu       (only when named) where a pipeline run's CPU goes: the model alone first (on a CPU, the
            pipeline section's per-core ceiling, once), then one run of --images photos (default 8)
            at the naive baseline's precision on a local Ray that is up, every process's CPU read
            every 0.5 s and put to its role: the model actors, the driver, the Assembler, Ray's
            other workers (decoding, finishing, assembling, and those Ray started and left unused),
            Ray's services (with Ray Data's once-per-cluster actors) and the rest of the machine.
            Every process on the machine counts: run it alone.
  shards    (only when named) peak memory while one Parquet shard of --shard-mb MB (incompressible
            512x512 PNGs in row groups of 16 rows, 13 MB; or with --shard-kind photos, 384x384 JPEG
            crops of photos, ~11x smaller than their pixels) goes through the pipeline, against one of
            a 16th of its size. Tiles take the skip path (--skip-detail 255) and outputs are JPEG, so that it
            takes minutes, not hours, on 2 cores: what is measured is the streaming of the shard
            through reading, staging and writing; the model's memory is per actor, whatever the shard.

Speed does not depend on the weights: `model` and `pipeline` use the untrained `--variant` (the full
model by default); `halo` and `skip` judge quality, so they use the shipped default weights.
`--quick` runs every section smaller: under 10 minutes on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from model.config import variant
from model.network import DenseIsoViT, parameter_count, pick_device, precision

SECTIONS = ("model", "codecs", "halo", "skip", "precision", "pipeline")
EXTRA_SECTIONS = ("shards", "profile", "actor", "startup", "cpu")  # run only when named: --sections shards (or ...)
STARTUP_CPUS = 16  # the startup section's node: the H200 node's cores (RESULTS.md)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")  # the pipeline's inputs
# Quality sections: astronaut and coffee are held out of training; page (a scanned page), the Hubble
# deep field (black sky) and the moon are what skipping is for (they were in the training set).
QUALITY_PHOTOS = ("astronaut", "coffee", "page", "hubble_deep_field", "moon")
# Dense bf16 tensor-core peaks, TFLOP/s (NVIDIA's data sheets, without sparsity).
BF16_PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0, "L4": 121.0}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# CPU features that decide the model's speed on a CPU: a model name alone ("AMD EPYC") does not tell
# a Zen 3 without AVX-512 (bf16 autocast there 11x slower than float32) from a Zen 4 with AVX512-BF16
# (1.8x faster), RESULTS.md.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine() -> dict[str, object]:
    cpu, family, features = platform.processor() or platform.machine(), None, []
    with contextlib.suppress(OSError):
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        cpu = fields.get("model name", cpu)
        family = f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}" if fields else None
        features = [f for f in CPU_FEATURES if f in fields.get("flags", "").split()]
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_family": family,
        "cpu_features": features,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def bf16_peak_tflops(name: str) -> float | None:
    """The data-sheet dense bf16 peak of the GPU called `name`, when known."""
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if all(part in name for part in key.split()):
            return tflops
    return None


# --- model ---------------------------------------------------------------------------------------


def speed_model(args: argparse.Namespace, device: torch.device) -> DenseIsoViT:
    """The untrained --variant for the speed sections, on `device`, laid out as TileUpscaler lays it
    out (channels-last on a GPU)."""
    model = DenseIsoViT(variant(args.variant)).to(device).eval()
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def flops_of(fn, x: torch.Tensor) -> int:
    """FLOPs of fn(x) (multiply-add = 2), as torch's FLOP counter counts them."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def halo_costs(model: DenseIsoViT, flops: int, halos: tuple[int, ...] = (0, 2, 4, 8, 12, 16)) -> dict[int, dict]:
    """Compute factor (T / (T - 2h))^2 and FLOPs per output pixel for each halo."""
    c = model.config
    out = {}
    for halo in halos:
        core = (c.tile_size - 2 * halo) * c.scale
        out[halo] = {
            "compute_factor": round((c.tile_size * c.scale / core) ** 2, 3),
            "flops_per_output_pixel": round(flops / core**2),
        }
    return out


def random_tiles(model: DenseIsoViT, device: torch.device, batch: int) -> torch.Tensor:
    """`batch` random tiles on `device`, channels-last on a GPU (as TileUpscaler gives them)."""
    tile = model.config.tile_size
    x = torch.rand(batch, model.config.in_channels, tile, tile, device=device)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def calls_per_second(fn, x: torch.Tensor, device: torch.device, *, dtype: str, seconds: float) -> float:
    """Calls of fn(x) per second over about `seconds`, after one warm-up call."""
    done = 0
    with torch.inference_mode(), precision(device, dtype):
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn(x)
            done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return done / (time.perf_counter() - start)


def time_forward(model: DenseIsoViT, device: torch.device, *, batch: int, dtype: str, seconds: float) -> float:
    """Tiles per second over about `seconds`, after one warm-up pass."""
    return batch * calls_per_second(model, random_tiles(model, device, batch), device, dtype=dtype, seconds=seconds)


def bench_model(args: argparse.Namespace, info: dict[str, object]) -> dict[str, object]:
    device = pick_device(args.device)
    model = speed_model(args, device)
    flops = flops_of(model, random_tiles(model, device, 1))
    out_pixels = (model.config.tile_size * model.config.scale) ** 2
    peak = bf16_peak_tflops(str(info.get("gpu", ""))) if device.type == "cuda" else None
    gpu = device.type == "cuda"
    batches = args.batch_sizes or ("1,32,128,512" if gpu else "1,4,8" if args.quick else "1,4,8,16")
    dtypes = args.dtypes or ("bfloat16" if gpu and args.quick else "float32,bfloat16")
    seconds = 2.0 if args.quick else 10.0
    sizes = [int(b) for b in batches.split(",")]
    runs = [(model, dtype, batch) for dtype in dtypes.split(",") for batch in sizes]
    if args.compile:  # the largest batch again, compiled as the pipeline's --compile does (TileUpscaler)
        compiled = torch.compile(model, dynamic=False)
        runs += [(compiled, dtype, max(sizes)) for dtype in dtypes.split(",")]
    rows = []
    for network, dtype, batch in runs:
        compiled, started = network is not model, time.perf_counter()
        if compiled:  # compiling (once for each dtype) stays out of the timed seconds, and is reported
            time_forward(network, device, batch=batch, dtype=dtype, seconds=0.0)
        compile_s = time.perf_counter() - started
        tiles_per_s = time_forward(network, device, batch=batch, dtype=dtype, seconds=seconds)
        row = {
            "dtype": dtype,
            "batch": batch,
            "tiles_per_s": round(tiles_per_s, 2),
            # output pixels of whole tiles, i.e. with halo 0; divide by compute_factor for a halo
            "output_mp_per_s": round(tiles_per_s * out_pixels / 1e6, 3),
            "gflop_per_s": round(tiles_per_s * flops / 1e9, 1),
        }
        if compiled:
            row["compile_s"] = round(compile_s, 1)
        if peak and dtype == "bfloat16":
            row["mfu"] = round(tiles_per_s * flops / (peak * 1e12), 3)
        rows.append(row)
        log(f"model {dtype:>9} batch {batch:>4}{' compiled' if compiled else ''}: {row['tiles_per_s']:9.2f} tiles/s")
    return {
        "variant": args.variant,
        "parameters": parameter_count(model),
        "device": str(device),
        "seconds_per_row": seconds,
        "gflop_per_tile": round(flops / 1e9, 3),
        "bf16_peak_tflops": peak,
        "halos": halo_costs(model, flops),
        "rows": rows,
    }


def top_kernels(fn, x: torch.Tensor, device: torch.device, *, dtype: str, calls: int = 3, top: int = 15) -> list[dict]:
    """torch.profiler's kernels (on a CPU, operators) that take the most of fn(x)'s time: each with
    its milliseconds per call and its share of the time of all of them."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    with torch.inference_mode(), precision(device, dtype):
        fn(x)  # warm-up: compiling, cuDNN's choices and lazy loading stay out of the profile
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn(x)
            if gpu:
                torch.cuda.synchronize()
    own = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if own(e) > 0]
    total = sum(own(e) for e in events) or 1
    events.sort(key=own, reverse=True)
    return [{"name": e.key, "ms_per_call": round(own(e) / calls / 1e3, 3), "share": round(own(e) / total, 4),
             "calls_per_forward": round(e.count / calls, 2)} for e in events[:top]]  # fmt: skip


def bench_profile(args: argparse.Namespace, info: dict[str, object]) -> dict[str, object]:
    """Where the model's time goes at one batch (the largest of --batch-sizes: 512 on a GPU, 8 on a
    CPU) and precision (the last of --dtypes: bf16 on a GPU): the whole forward pass, the transformer
    body and the convolutional head timed apart, each with its own FLOPs (and MFU on a known GPU);
    with --compile the forward pass compiled too; and torch.profiler's kernels that take the most
    time, eager and compiled."""
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    model = speed_model(args, device)
    batch = max(int(b) for b in (args.batch_sizes or ("512" if gpu else "8")).split(","))
    dtype = (args.dtypes or ("bfloat16" if gpu else "float32")).split(",")[-1]
    seconds = 2.0 if args.quick else 10.0
    peak = bf16_peak_tflops(str(info.get("gpu", ""))) if gpu and dtype == "bfloat16" else None
    x = random_tiles(model, device, batch)
    with torch.inference_mode(), precision(device, dtype):
        dense = model.body(x)
    # (name, what is timed, its input, what is counted: the compiled forward pass does the eager one's FLOPs)
    parts = [("whole forward pass", model, x, model), ("body: patch embedding and the transformer stages", model.body, x, model.body),
             ("head: fusion, x2 sub-pixel stages, to RGB", model.head, dense, model.head)]  # fmt: skip
    kernels = {"eager": top_kernels(model, x, device, dtype=dtype)}
    if args.compile:
        compiled = torch.compile(model, dynamic=False)
        started = time.perf_counter()
        calls_per_second(compiled, x, device, dtype=dtype, seconds=0.0)  # compiles
        log(f"profile: compiled in {time.perf_counter() - started:.1f} s")
        parts.append(("whole forward pass, torch.compile", compiled, x, model))
        kernels["compiled"] = top_kernels(compiled, x, device, dtype=dtype)
    rows = []
    for name, fn, arg, counted in parts:
        per_s = calls_per_second(fn, arg, device, dtype=dtype, seconds=seconds)
        flops = flops_of(counted, arg[:1])
        row = {"part": name, "gflop_per_tile": round(flops / 1e9, 3), "ms_per_batch": round(1e3 / per_s, 2),
               "tiles_per_s": round(per_s * batch, 1), "tflop_per_s": round(per_s * batch * flops / 1e12, 3)}  # fmt: skip
        if peak:
            row["mfu"] = round(row["tflop_per_s"] / peak, 3)
        rows.append(row)
        log(f"profile {name}: {row}")
    return {"variant": args.variant, "device": str(device), "dtype": dtype, "batch": batch, "rows": rows,
            "kernels": kernels}  # fmt: skip


# --- codecs ----------------------------------------------------------------------------------------

# (label, Pillow format, save options: None for isosr's own writer, pipeline.images.encode); the first of
# each format is what isosr writes.
ENCODERS = (
    ("PNG, libpng: Paeth filter, zlib's RLE, level 1 (isosr)", "PNG", None),  # pipeline.images.encode
    ("PNG, Pillow, zlib level 1", "PNG", {"compress_level": 1}),
    ("PNG, Pillow, level 3", "PNG", {"compress_level": 3}),
    ("PNG, Pillow, level 6 (Pillow's default)", "PNG", {"compress_level": 6}),
    ("JPEG q95 (isosr)", "JPEG", {"quality": 95}),
    ("WebP q95, method 4 (isosr)", "WEBP", {"quality": 95}),
    ("WebP q95, method 0", "WEBP", {"quality": 95, "method": 0}),
    ("AVIF q95, speed 10 (isosr)", "AVIF", {"quality": 95, "speed": 10, "max_threads": 1}),
    ("AVIF q95, speed 6 (Pillow's default)", "AVIF", {"quality": 95, "max_threads": 1}),
    ("JPEG 2000, lossless (isosr)", "JPEG2000", {}),
    ("HEIC q95 (read only: written as JPEG; x265 encodes on its own threads)", "HEIF", {"quality": 95}),
)


def output_like_photo(quick: bool) -> np.ndarray:
    """A photo at an output's size: scikit-image's astronaut (512x512) upscaled x4 with Lanczos."""
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut())
    side = 1024 if quick else 2048
    return np.asarray(photo.resize((side, side), Image.LANCZOS))


def _timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times of fn(), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_codecs(args: argparse.Namespace) -> dict[str, object]:
    """One thread: Pillow's codecs do not use more for one image, and isosr runs one task per core.
    libavif and libheif would decode on threads of their own: they are held to one here."""
    import pillow_heif
    from PIL import AvifImagePlugin

    import pipeline.images  # also registers pillow-heif's HEIF codec with Pillow

    AvifImagePlugin.DEFAULT_MAX_THREADS, pillow_heif.options.DECODE_THREADS = 1, 1
    pixels = output_like_photo(args.quick)
    image = Image.fromarray(pixels)
    mp = pixels.shape[0] * pixels.shape[1] / 1e6
    repeats = 2 if args.quick else 5
    rows = []
    for label, fmt, options in ENCODERS:
        buffer = io.BytesIO()

        def encode(fmt=fmt, options=options, buffer=buffer) -> None:
            buffer.seek(0)
            buffer.truncate()
            if options is None:  # isosr's own writer
                buffer.write(pipeline.images.encode(pixels, fmt))
            else:
                image.save(buffer, format=fmt, **options)

        encode_s = _timed(encode, repeats)
        data = buffer.getvalue()
        decode_s = _timed(lambda data=data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), repeats)
        rows.append(
            {
                "encoder": label,
                "format": fmt,
                "encode_mp_per_s": round(mp / encode_s, 2),
                "decode_mp_per_s": round(mp / decode_s, 2),
                "bytes_per_pixel": round(len(data) / (mp * 1e6), 3),
            }
        )
        log(f"codecs {label}: encode {rows[-1]['encode_mp_per_s']} MP/s, decode {rows[-1]['decode_mp_per_s']} MP/s")
    return {"image": f"{pixels.shape[1]}x{pixels.shape[0]} RGB photo", "threads": 1, "rows": rows}


# --- quality sections: halo and skip ---------------------------------------------------------------


def quality_pairs(args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, HR, LR) photo pairs: the photos under --photos, else scikit-image's QUALITY_PHOTOS;
    LR is the quality checks' bicubic x4 degradation. --quick centre-crops HR to 1024 pixels a side."""
    import skimage.data

    from model.metrics import bicubic_downscale_array, modcrop

    if args.photos:
        files = sorted(p for folder in args.photos for p in folder.iterdir() if p.is_file())
        named = [(p.name, np.asarray(Image.open(p).convert("RGB"))) for p in files]
    else:
        named = [(n, getattr(skimage.data, n)()) for n in QUALITY_PHOTOS]
    pairs = []
    for name, hr in named:
        hr = np.dstack([hr] * 3) if hr.ndim == 2 else hr[..., :3]
        if args.quick:
            h, w = min(hr.shape[0], 1024), min(hr.shape[1], 1024)
            y0, x0 = (hr.shape[0] - h) // 2, (hr.shape[1] - w) // 2
            hr = hr[y0 : y0 + h, x0 : x0 + w]
        hr = np.ascontiguousarray(modcrop(hr, 4))
        pairs.append((name, hr, bicubic_downscale_array(hr, 4)))
    return pairs


def warm_up(model: DenseIsoViT, device: str | None) -> None:
    """One untimed pass, so that the first timed row does not pay for torch's first calls."""
    from model.inference import TileUpscaler
    from model.tiling import upscale_array

    upscale_array(np.zeros((200, 200, 3), np.uint8), TileUpscaler(model, device=device, dtype="float32"))


def seam_ratio(sr: np.ndarray, hr: np.ndarray, *, tile: int, halo: int, scale: int, width: int = 4) -> float:
    """Mean absolute error within `width` output pixels of the lines where tiles hand over (the
    middle of each overlap), over the mean absolute error elsewhere: 1.0 is no visible seam."""
    from model.tiling import axis_starts

    error = np.abs(sr.astype(np.float64) - hr.astype(np.float64)).mean(axis=2)
    near = np.zeros(error.shape, dtype=bool)
    for axis, length in ((0, hr.shape[0] // scale), (1, hr.shape[1] // scale)):
        starts = axis_starts(length, tile, halo)
        for a, b in itertools.pairwise(starts):
            line = round((a + tile + b) / 2 * scale)  # the middle of the overlap of two neighbours
            index = [slice(None), slice(None)]
            index[axis] = slice(max(0, line - width), line + width)
            near[tuple(index)] = True
    if not near.any():
        return 1.0
    return float(error[near].mean() / error[~near].mean())


def bench_halo(args: argparse.Namespace) -> dict[str, object]:
    from model.inference import TileUpscaler, load_model
    from model.metrics import psnr
    from model.tiling import plan_tiles, upscale_array

    source = load_model(None)
    runner = TileUpscaler(source.model, device=args.device, dtype="float32")
    tile = source.model.config.tile_size
    pairs = quality_pairs(args)
    warm_up(source.model, args.device)
    rows = []
    for halo in (0, 2, 4, 8, 12):
        scores, ratios, tiles, seconds = [], [], 0, 0.0
        for _, hr, lr in pairs:
            start = time.perf_counter()
            sr = upscale_array(lr, runner, halo=halo)
            seconds += time.perf_counter() - start
            scores.append(psnr(sr, hr, y_channel=True))
            ratios.append(seam_ratio(sr, hr, tile=tile, halo=halo, scale=4))
            tiles += len(plan_tiles(lr.shape[0], lr.shape[1], tile=tile, halo=halo))
        rows.append(
            {
                "halo": halo,
                "tiles": tiles,
                "seconds": round(seconds, 2),
                "psnr_y": round(float(np.mean(scores)), 4),
                "seam_error_ratio": round(float(np.mean(ratios)), 3),
                "worst_seam_error_ratio": round(float(np.max(ratios)), 3),
            }
        )
        log(f"halo {halo}: {rows[-1]}")
    return {"weights": source.description, "photos": [n for n, _, _ in pairs], "rows": rows}


def bench_skip(args: argparse.Namespace) -> dict[str, object]:
    from model.inference import TileUpscaler, load_model
    from model.metrics import psnr
    from model.tiling import DEFAULT_SKIP_DETAIL, upscale_array

    source = load_model(None)
    pairs = quality_pairs(args)
    warm_up(source.model, args.device)
    levels = (0.0, DEFAULT_SKIP_DETAIL, 1.0) if args.quick else (0.0, 0.25, DEFAULT_SKIP_DETAIL, 0.75, 1.0, 1.5)
    rows, base = [], None
    for level in levels:
        runner = TileUpscaler(source.model, device=args.device, dtype="float32", skip_detail=level)
        per_photo, start = {}, time.perf_counter()
        for name, hr, lr in pairs:
            per_photo[name] = psnr(upscale_array(lr, runner), hr, y_channel=True)
        seconds = time.perf_counter() - start
        base = base or (per_photo, seconds)
        losses = {n: base[0][n] - v for n, v in per_photo.items()}
        rows.append(
            {
                "skip_detail": level,
                "tiles_skipped": round(runner.tiles_skipped / (runner.tiles_run + runner.tiles_skipped), 4),
                "seconds": round(seconds, 2),
                "speed_up": round(base[1] / seconds, 3),
                "mean_psnr_y_loss_db": round(float(np.mean(list(losses.values()))), 4),
                "worst_psnr_y_loss_db": round(max(losses.values()), 4),
                "per_photo": {n: {"skipped_loss_db": round(v, 4)} for n, v in losses.items()},
            }
        )
        log(f"skip {level}: { ({k: v for k, v in rows[-1].items() if k != 'per_photo'}) }")
    default = next(r for r in rows if r["skip_detail"] == DEFAULT_SKIP_DETAIL)
    return {
        "weights": source.description,
        "photos": [n for n, _, _ in pairs],
        "default_skip_detail": DEFAULT_SKIP_DETAIL,
        "default_within_0_02_db": default["worst_psnr_y_loss_db"] <= 0.02,
        "rows": rows,
    }


def bench_precision(args: argparse.Namespace) -> dict[str, object]:
    from model.inference import TileUpscaler, load_model
    from model.metrics import psnr
    from model.tiling import upscale_array

    source = load_model(None)
    fast = "float16" if pick_device(args.device).type == "cuda" and not torch.cuda.is_bf16_supported() else "bfloat16"
    rows = []
    for name, hr, lr in quality_pairs(args):
        reference = upscale_array(lr, TileUpscaler(source.model, device=args.device, dtype="float32"))
        out = upscale_array(lr, TileUpscaler(source.model, device=args.device, dtype=fast))
        diff = np.abs(out.astype(np.int32) - reference.astype(np.int32))
        rows.append(
            {
                "photo": name,
                "psnr_y_float32": round(psnr(reference, hr, y_channel=True), 4),
                f"psnr_y_{fast}": round(psnr(out, hr, y_channel=True), 4),
                "max_difference": int(diff.max()),
                "share_differing": round(float((diff > 0).mean()), 4),
            }
        )
        log(f"precision {rows[-1]}")
    return {"weights": source.description, "dtype": fast, "rows": rows}


# --- pipeline, ceiling and the naive baseline ------------------------------------------------------


def write_photos(folder: Path, count: int) -> list[Path]:
    """`count` PNG files cycling through scikit-image's bundled RGB photos (no download)."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        path = folder / f"{i:04d}-{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths.append(path)
    return paths


def output_mp(paths: list[Path], scale: int = 4) -> float:
    sizes = [Image.open(p).size for p in paths]
    return sum(w * h for w, h in sizes) * scale**2 / 1e6


def photo_tiles(paths: list[Path], *, tile: int, halo: int) -> np.ndarray:
    """Every tile the pipeline runs for the photos (each plane of each photo), pre-made, in order."""
    from model.tiling import _planes, extract_tiles, plan_tiles

    tiles = []
    for path in paths:
        pixels = np.asarray(Image.open(path))
        plan = plan_tiles(pixels.shape[0], pixels.shape[1], tile=tile, halo=halo)
        tiles.extend(extract_tiles(plane, plan) for plane in _planes(pixels))
    return np.concatenate(tiles)


def time_tiles(tiles: np.ndarray, model: DenseIsoViT, *, batch_size: int, dtype: str) -> float:
    """Seconds the model takes over `tiles` in batches of `batch_size`, after one warm-up batch."""
    all_tiles = torch.from_numpy(tiles)
    device = next(model.parameters()).device
    with torch.inference_mode(), precision(device, dtype):
        model(all_tiles[:batch_size].to(device))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(all_tiles), batch_size):
            model(all_tiles[i : i + batch_size].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def model_ceiling(paths: list[Path], model: DenseIsoViT, *, halo: int, batch_size: int, dtype: str) -> dict[str, float]:
    """Output MP/s of the model alone over the photos' tiles, pre-made, in this process."""
    tiles = photo_tiles(paths, tile=model.config.tile_size, halo=halo)
    seconds = time_tiles(tiles, model, batch_size=batch_size, dtype=dtype)
    return {
        "processes": 1,
        "tiles": len(tiles),
        "seconds": round(seconds, 2),
        "output_mp_per_s": round(output_mp(paths) / seconds, 4),
    }


def bracketed(before: dict[str, float], after: dict[str, float], megapixels: float) -> dict[str, float]:
    """One ceiling from two measurements of the same tiles (`megapixels` of output): their mean
    time, and both times."""
    seconds = (before["seconds"] + after["seconds"]) / 2
    return {
        "processes": before["processes"],
        "tiles": before["tiles"],
        "seconds": round(seconds, 2),
        "output_mp_per_s": round(megapixels / seconds, 4),
        "seconds_before": before["seconds"],
        "seconds_after": after["seconds"],
    }


def _ceiling_share(job: tuple[str, list[str], int, int, int, int, str]) -> tuple[int, float]:
    """One single-threaded process's share of the photos' tiles: every `stride`-th from `offset`."""
    checkpoint, paths, offset, stride, halo, batch_size, dtype = job
    from model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    model = load_checkpoint(checkpoint).model
    mine = photo_tiles([Path(p) for p in paths], tile=model.config.tile_size, halo=halo)[offset::stride]
    return len(mine), time_tiles(np.ascontiguousarray(mine), model, batch_size=batch_size, dtype=dtype)


@contextlib.contextmanager
def model_actor_environ():
    """This process's environment, while processes started inside get the environment variables of the
    pipeline's model actors (pipeline.stages.MODEL_ENV: malloc's settings and Arrow's allocator), as
    Ray gives them."""
    from pipeline.stages import MODEL_ENV

    before = dict(os.environ)
    for key, value in MODEL_ENV.items():
        os.environ[key] = value.replace(f"${{{key}}}", before.get(key, "")).rstrip(":")
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


def parallel_ceiling(paths: list[Path], checkpoint: str, *, halo: int, batch_size: int, dtype: str) -> dict[str, float]:
    """The model alone in one single-threaded process per core, started together, each with an equal
    share of the tiles: the pipeline's layout on CPU (one single-threaded model actor per core, with
    its malloc settings), with no other work beside it. Where torch's threads do not scale perfectly,
    a stricter ceiling than one process."""
    cores = os.cpu_count() or 1
    jobs = [(checkpoint, [str(p) for p in paths], i, cores, halo, batch_size, dtype) for i in range(cores)]
    with model_actor_environ(), multiprocessing.get_context("spawn").Pool(cores) as pool:
        shares = pool.map(_ceiling_share, jobs)
    seconds = max(s for _, s in shares)
    return {"processes": cores, "tiles": sum(t for t, _ in shares), "seconds": round(seconds, 2),
            "output_mp_per_s": round(output_mp(paths) / seconds, 4)}  # fmt: skip


def naive_dtype(device: torch.device, default: str) -> str:
    """The naive baseline's precision, as Real-ESRGAN runs: float32 on a CPU, half precision (the
    pipeline's default there, bf16 where the GPU has it) on a GPU."""
    return "float32" if device.type == "cpu" else default


def naive_run(
    paths: list[Path], out: Path, model: DenseIsoViT, *, halo: int, device: str | None, dtype: str
) -> dict[str, float]:
    """The naive baseline: one process, each image read with Pillow, its tiles run one at a time
    (batch 1; the same tiler and halo) at `dtype` (naive_dtype), written with Pillow's PNG encoder at
    zlib level 1 (isosr's own PNG writer is ~2x faster: "codecs"). Model loaded before the clock
    starts."""
    from model.inference import TileUpscaler
    from model.tiling import upscale_array

    runner = TileUpscaler(model, device=device, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    runner(np.zeros((1, 3, model.config.tile_size, model.config.tile_size), np.float32))  # warm-up
    start = time.perf_counter()
    for path in paths:
        pixels = np.asarray(Image.open(path))
        result = upscale_array(pixels, runner, halo=halo, batch_size=1)
        Image.fromarray(result).save(out / path.name, compress_level=1)
    seconds = time.perf_counter() - start
    return {
        "images": len(paths),
        "dtype": runner.dtype,
        "tiles": runner.tiles_run,
        "seconds": round(seconds, 2),
        "output_mp_per_s": round(output_mp(paths) / seconds, 4),
    }


def max_difference(a: Path, b: Path) -> int:
    """The largest difference of any pixel between same-named PNGs in two folders: the pipeline's
    outputs against the naive baseline's. Same tiler, model and precision, but forward batches of
    many tiles against 1 sum in another order, so a value can round to the next level: at most 1 in
    float32; bf16 (the naive baseline's on a GPU) rounds coarser."""
    worst = 0
    for path in sorted(a.glob("*.png")):
        x = np.asarray(Image.open(path), dtype=np.int32)
        y = np.asarray(Image.open(b / path.name), dtype=np.int32)
        if x.shape != y.shape:
            raise RuntimeError(f"{path.name}: the pipeline wrote {y.shape}, the naive baseline {x.shape}")
        worst = max(worst, int(np.abs(x - y).max()))
    return worst


class PeakMemory:
    """Peaks, sampled in a thread, of this process and all its descendants: PSS (`peak`), its private
    part (`peak_private`: Pss_Anon, the processes' own heaps) and, while Ray is up, the bytes of
    objects alive in Ray's object store (`peak_objects`). Pages of the object store's shared-memory
    arena stay resident once touched, even after the objects in them are freed, so PSS grows with a
    run's length up to the store's size (30 % of RAM by default) while the live objects do not."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        import psutil

        self.peak = self.peak_private = self.peak_objects = 0
        self.private_by_process: dict[str, int] = {}  # at the peak of `peak_private`: process -> bytes
        self._stop = threading.Event()
        me = psutil.Process()

        def sample() -> None:
            import ray

            while not self._stop.is_set():
                total, by_process = 0, {}
                for p in [me, *me.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                        with open(f"/proc/{p.pid}/smaps_rollup") as f:
                            anon = sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss_Anon:"))
                        by_process[f"{p.pid} {p.name()}"] = anon  # Ray names its workers by task or actor
                    except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                        pass
                private = sum(by_process.values())
                if private > self.peak_private:
                    self.peak_private, self.private_by_process = private, by_process
                self.peak = max(self.peak, total)
                if ray.is_initialized():
                    with contextlib.suppress(Exception):  # Ray may be shutting down under us
                        used = (
                            ray.cluster_resources()["object_store_memory"]
                            - ray.available_resources()["object_store_memory"]
                        )
                        self.peak_objects = max(self.peak_objects, int(used))
                self._stop.wait(interval)

        self._thread = threading.Thread(target=sample, daemon=True)

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 - Python 3.11's typing.Self would do; kept plain
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pipeline_run(
    src: Path,
    dst: Path,
    args: argparse.Namespace,
    checkpoint: str,
    *,
    memory: bool,
    precision: str = "auto",
    timeline: bool = False,
    skip_detail: float = 0.0,
) -> dict[str, object]:
    """One run of the pipeline, by default with skipping off (every tile runs, as in the ceiling and
    the naive baseline); with `memory`, its peak PSS too. Reading PSS walks every page table of every Ray
    process (the object store maps gigabytes), which costs real CPU: runs timed for throughput do
    not sample. With `timeline` (on a Ray that is up before and after the run), where its time went
    (`time_split`, read from Ray's task events after the run) and the share of the machine's cores
    busy while it ran (all processes: the bench runs alone)."""
    import psutil

    from pipeline.run import RunOptions, run

    options = RunOptions(
        src=str(src), dst=str(dst), checkpoint=checkpoint, halo=args.halo, device=args.device,
        skip_existing=False, skip_detail=skip_detail, precision=precision,
    )  # fmt: skip
    sampler = PeakMemory(interval=0.5) if memory else None
    with sampler or contextlib.nullcontext():
        cpu_before, epoch = psutil.cpu_times(), time.time()
        start = time.perf_counter()
        result = run(options)
        seconds = time.perf_counter() - start
        cpu_after = psutil.cpu_times()
    s = result.summary
    if s["counts"]["ok"] != s["counts"]["inputs"]:
        raise RuntimeError(f"pipeline benchmark: {s['failed']}")
    out: dict[str, object] = {
        "images": s["counts"]["inputs"],
        "tiles": s["tiles"]["total"],
        "seconds": round(seconds, 2),
        "output_mp": round(s["megapixels_out"], 3),
        "output_mp_per_s": round(s["megapixels_out"] / seconds, 4),
        "peak_memory_mib": round(sampler.peak / 2**20) if sampler else None,
    }
    if timeline:
        out["cores_busy"] = round(busy_seconds(cpu_before, cpu_after) / ((psutil.cpu_count() or 1) * seconds), 3)
        pieces = sum(n or 1 for n in result.manifest.column("piece_count").to_pylist())
        events = model_actor_events(epoch, pieces)
        out["time_split"] = (
            time_split(events[MODEL_PIECE], seconds=seconds, inits=events[MODEL_INIT]) if events else None
        )
    return out


# Where the CPU time of `psutil.cpu_times()` is work (guest time is inside user time; steal, iowait
# and idle are not this machine's work).
CPU_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq")


def busy_seconds(before, after) -> float:
    """The machine's busy CPU seconds between two `psutil.cpu_times()` readings."""
    return sum(getattr(after, f) - getattr(before, f) for f in CPU_BUSY_FIELDS if hasattr(after, f))


# Ray Data's name for a model actor: its task events (`ray.timeline()`) name its `__init__` and its
# call on one piece (Ray Data runs the actor's `__call__` inside `MapWorker.submit`) after it, and its
# process titles itself after it (bench_cpu).
MODEL_ACTOR = "MapWorker(MapBatches(TileWorker))"
MODEL_INIT = f"task::{MODEL_ACTOR}.__init__"
MODEL_PIECE = f"task::{MODEL_ACTOR}.submit"


def model_actor_events(since: float, pieces: int, *, wait: float = 10.0) -> dict[str, list] | None:
    """The model actors' `__init__`s (MODEL_INIT) and pieces (MODEL_PIECE) that began after `since`
    (epoch seconds), each as (actor, start, end) in seconds from `since`. Ray reports task events once
    a second: this waits up to `wait` seconds for all `pieces` of the run to be reported. None, said on
    stderr, if they are not (a split made of some of them would be wrong;
    RAY_task_events_report_interval_ms=0 turns them off)."""
    import ray

    deadline = time.monotonic() + wait
    while True:
        events: dict[str, list] = {MODEL_INIT: [], MODEL_PIECE: []}
        for e in ray.timeline():
            if e.get("cat") in events and e.get("ph") == "X" and e["ts"] / 1e6 >= since:
                start = e["ts"] / 1e6 - since
                events[e["cat"]].append((e["tid"], start, start + e["dur"] / 1e6))
        if len(events[MODEL_PIECE]) >= pieces or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if len(events[MODEL_PIECE]) != pieces:
        log(f"no time split: Ray's task events show {len(events[MODEL_PIECE])} model pieces for a run of {pieces}")
        return None
    return events


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """How long at least one of the (start, end) spans was open."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def time_split(
    spans: list[tuple[str, float, float]], *, seconds: float, inits: list[tuple[str, float, float]] = ()
) -> dict[str, object]:
    """A pipeline run of `seconds` split, exactly, from its model actors' pieces (actor, start, end;
    seconds from the run's start), taking the mean over the actors where they differ:
      start_s    until an actor's first piece;
      busy_s     running pieces (while one at least runs: an actor may hold more than one);
      waiting_s  between an actor's first piece and its last, waiting for the next one;
      tail_s     the last actor's end after the mean actor's: pieces that did not share out evenly;
      finish_s   after the last piece: its finishing and writing, the manifest and the reports.
    With every such actor's `__init__` in `inits` (same form), start_s split too, exactly:
      before_init_s  the driver checking the model and planning, Ray starting the actor's process;
      init_s         its `__init__`: torch's import and the model's load;
      first_piece_wait_s  from then until its first piece (decoding, or the hand-off).
    Also per actor: its pieces, first start, time busy and last end (and its `__init__`'s start and length)."""
    by_actor: dict[str, list[tuple[float, float]]] = {}
    for actor, start, end in spans:
        by_actor.setdefault(actor, []).append((start, end))
    init = {actor: (start, end) for actor, start, end in inits}
    actors = []
    for actor, s in by_actor.items():
        actors.append({"pieces": len(s), "first_s": min(a for a, _ in s), "busy_s": union_seconds(s),
                       "end_s": max(b for _, b in s)})  # fmt: skip
        if actor in init:
            actors[-1] |= {"init_start_s": init[actor][0], "init_s": init[actor][1] - init[actor][0]}

    def mean(key: str) -> float:
        return sum(a[key] for a in actors) / len(actors)

    last = max(a["end_s"] for a in actors)
    split = {
        "start_s": mean("first_s"),
        "busy_s": mean("busy_s"),
        "waiting_s": mean("end_s") - mean("first_s") - mean("busy_s"),
        "tail_s": last - mean("end_s"),
        "finish_s": seconds - last,
    }
    if all("init_s" in a for a in actors):
        split |= {
            "before_init_s": mean("init_start_s"),
            "init_s": mean("init_s"),
            "first_piece_wait_s": mean("first_s") - mean("init_start_s") - mean("init_s"),
        }
    return {key: round(v, 2) for key, v in split.items()} | {
        "actors": [{key: round(v, 2) for key, v in a.items()} for a in sorted(actors, key=lambda a: a["first_s"])]
    }


def write_shard(path: Path, megabytes: int, kind: str = "noise") -> dict[str, int]:
    """A Parquet shard of about `megabytes` MB of images beside an id and a caption, written a row
    group at a time. Returns its rows, bytes and decoded bytes. The images, by `kind`:
      noise   512x512 incompressible PNGs (random pixels), 16 a row group: decoded size = file size;
      photos  384x384 JPEG crops (quality 90), mirrored at random, of scikit-image's bundled photos,
              64 a row group, no two alike: the LAION case, ~11x smaller than their pixels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import skimage.data

    side, group_rows = (384, 64) if kind == "photos" else (512, 16)
    rng = np.random.default_rng(0)
    photos = [p for p in (np.asarray(getattr(skimage.data, name)()) for name in PHOTOS) if min(p.shape[:2]) >= side]

    def image() -> bytes:
        buffer = io.BytesIO()
        if kind == "photos":
            photo = photos[rng.integers(len(photos))]
            y, x = (int(rng.integers(0, n - side + 1)) for n in photo.shape[:2])
            crop = np.ascontiguousarray(photo[y : y + side, x : x + side][:, :: rng.choice([1, -1])])
            Image.fromarray(crop).save(buffer, "JPEG", quality=90)
        else:
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG", compress_level=1)
        return buffer.getvalue()

    schema = pa.schema([("id", pa.int64()), ("caption", pa.string()), ("image", pa.binary())])
    rows = written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        while written < megabytes * 1e6:
            images = [image() for _ in range(group_rows)]
            ids = list(range(rows, rows + group_rows))
            writer.write_table(
                pa.table({"id": ids, "caption": [f"{kind} {i}" for i in ids], "image": images}, schema=schema)
            )
            rows += group_rows
            written += sum(len(b) for b in images)
    return {"rows": rows, "file_bytes": path.stat().st_size, "decoded_bytes": rows * side * side * 3}


def bench_shards(args: argparse.Namespace) -> dict[str, object]:
    """Peak memory (PSS of this process and every Ray process) while a Parquet shard of --shard-mb MB,
    and one of a 16th of that, go through `isosr upscale` on a local Ray."""
    from pipeline.run import RunOptions, run

    out: dict[str, object] = {"shard_mb": args.shard_mb, "kind": args.shard_kind, "runs": []}
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    for megabytes in (max(1, args.shard_mb // 16), args.shard_mb):
        with tempfile.TemporaryDirectory(prefix="isosr-shards-", dir=args.workdir) as root:
            shard = write_shard(Path(root) / "in" / "shard.parquet", megabytes, args.shard_kind)
            options = RunOptions(
                src=f"{root}/in", dst=f"{root}/out", skip_detail=255.0, output_format="JPEG", skip_existing=False,
                spot_check_rate=0.0,
            )  # fmt: skip
            with PeakMemory(interval=1.0) as sampler:
                start = time.perf_counter()
                result = run(options)
                seconds = time.perf_counter() - start
            counts = result.summary["counts"]
            if counts["ok"] != shard["rows"]:
                raise RuntimeError(f"shards benchmark: {counts}, {result.failed[:3]}")
            row = {**shard, "seconds": round(seconds, 1), "peak_memory_mib": round(sampler.peak / 2**20),
                   "peak_private_mib": round(sampler.peak_private / 2**20),
                   "peak_object_store_mib": round(sampler.peak_objects / 2**20),
                   "output_mp": round(result.summary["megapixels_out"], 1)}  # fmt: skip
            log(f"shard of {megabytes} MB: {row}")
            top = sorted(sampler.private_by_process.items(), key=lambda kv: -kv[1])[:8]
            log("  private memory at its peak, by process: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in top))
            out["runs"].append(row)
    small, large = out["runs"]
    out["growth_mib"] = large["peak_memory_mib"] - small["peak_memory_mib"]
    return out


class _ReadyOutputs:
    """The network standing in at no cost (bench_actor): the same outputs for every batch, as a GPU's
    land in a pinned host buffer that torch caches, while the actor's CPU waits for them."""

    def __init__(self, side: int) -> None:
        self.side, self.out = side, np.zeros((0, 3, side, side), np.float32)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        if len(tiles) > len(self.out):
            self.out = np.random.default_rng(0).random((len(tiles), 3, self.side, self.side), dtype=np.float32)
        return self.out[: len(tiles)]


def _actor_work(job: tuple[str, list[str], int, int, int]) -> dict[str, float]:
    """bench_actor's measurement in a fresh process: `repeats` rounds over the photos, `at_once` calls
    at a time in threads (1: one after another), after one round to warm up."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from model.inference import MAX_AUTO_BATCH
    from model.tiling import DEFAULT_SKIP_DETAIL
    from pipeline.stages import TileWorker, decode_stage

    checkpoint, paths, halo, at_once, repeats = job
    worker = TileWorker(checkpoint=checkpoint, device="cpu", precision="float32", batch_size=MAX_AUTO_BATCH,
                        halo=halo, threads=1, skip_detail=DEFAULT_SKIP_DETAIL)  # fmt: skip
    runner = worker.runner
    runner._network = _ReadyOutputs(runner.tile_size * runner.scale)  # every other step of TileUpscaler stays
    listing = [{"source": p, "key": Path(p).name, "size_bytes": 0, "source_version": "", "output": "",
                "out_format": "PNG", "spot_check": False} for p in paths]  # fmt: skip
    rows = decode_stage(pa.Table.from_pylist(listing), tile=runner.tile_size, scale=runner.scale, halo=halo,
                        max_tiles=MAX_AUTO_BATCH, max_pixels=None)  # fmt: skip
    pieces = [rows.slice(i, 1) for i in range(rows.num_rows)]
    for piece in pieces:
        worker(piece)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        list(pool.map(worker, pieces * repeats))
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    n = len(pieces) * repeats
    return {
        "calls_at_once": at_once,
        "photos": n,
        "ms_per_photo": round(1e3 * seconds / n, 1),
        "cpu_ms_per_photo": round(1e3 * (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n, 1),
        "system_ms_per_photo": round(1e3 * (after.ru_stime - before.ru_stime) / n, 1),
        "page_faults_per_photo": round((after.ru_minflt - before.ru_minflt) / n),
    }


def bench_actor(args: argparse.Namespace) -> dict[str, object]:
    """A model actor's CPU work a photo beside the network (see the module's docstring), with the
    allocators' defaults and with the model actors' settings, one call at a time and as a GPU actor
    runs them."""
    from model.checkpoint import save_checkpoint
    from pipeline.run import GPU_CALLS_PER_ACTOR

    repeats = 4 if args.quick else 16
    out: dict[str, object] = {"variant": args.variant, "halo": args.halo, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "model.safetensors")
        save_checkpoint(speed_model(args, torch.device("cpu")), checkpoint)
        photos = [str(p) for p in write_photos(Path(tmp) / "photos", len(PHOTOS))]
        for environ in ("defaults", "MODEL_ENV"):
            for at_once in (1, GPU_CALLS_PER_ACTOR):
                job = (checkpoint, photos, args.halo, at_once, repeats)
                settings = model_actor_environ() if environ == "MODEL_ENV" else contextlib.nullcontext()
                with settings, multiprocessing.get_context("spawn").Pool(1) as pool:
                    row = {"environ": environ} | pool.apply(_actor_work, (job,))
                log(f"actor: {row}")
                out["runs"].append(row)
    return out


class StartedWorkers:
    """The Ray worker processes (the processes Ray starts for tasks and actors: `ray::` titles) that
    start, under this process, while the block runs: `count` after it. Polled every 0.1 s; a worker
    takes about a second to start, so none is missed."""

    def __enter__(self) -> Self:
        import threading

        self.count, self._before, self._seen = 0, self._workers(), set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.count = len(self._seen - self._before)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self._seen |= self._workers()

    @staticmethod
    def _workers() -> set[int]:
        import psutil

        pids = set()
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if ray_worker(" ".join(p.cmdline())):
                    pids.add(p.pid)
        return pids


def ray_worker(command: str) -> bool:
    """A process that Ray started for tasks and actors, by its command line: a worker titles itself
    `ray::<actor class or task>`, and runs default_worker.py until it does."""
    return command.startswith("ray::") or "default_worker.py" in command


def bench_startup(args: argparse.Namespace) -> dict[str, object]:
    """A run's start on a node of many CPUs beside one model actor (see the module's docstring): on
    the H200's 16 cores the model actor's `__init__` took 16 s in a run against 6.6 s alone."""

    from model.checkpoint import save_checkpoint

    images, runs = args.images or 48, 1 if args.quick else 3
    out: dict[str, object] = {"variant": args.variant, "cpus": STARTUP_CPUS, "images": images, "runs": []}
    on_cpu = argparse.Namespace(**{**vars(args), "device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = str(root / "model.safetensors")
        save_checkpoint(speed_model(args, torch.device("cpu")), checkpoint)
        write_photos(root / "photos", images)
        for i in range(runs):
            with ray_up(address="local", num_cpus=STARTUP_CPUS, num_gpus=1), StartedWorkers() as started:
                run = pipeline_run(root / "photos", root / f"out-{i}", on_cpu, checkpoint, memory=False,
                                   precision="float32", timeline=True, skip_detail=255.0)  # fmt: skip
            split = run["time_split"] or {}
            row = {"seconds": run["seconds"], "workers_started": started.count}
            row |= {k: split.get(k) for k in ("start_s", "before_init_s", "init_s")}
            log(f"startup: {row}")
            out["runs"].append(row)
    return out


# A process's part in a pipeline run (bench_cpu), by its command: Ray titles its worker processes
# `ray::<actor class or task>` and runs its services as programs of their own (the program is one of
# the first three words: `python -u path`). Ray Data's once-per-cluster actors count with Ray's
# services: like them, they are there whatever the run does.
RAY_SERVICE_TITLES = (
    "ray::DashboardAgent",
    "ray::_StatsActor",
    "ray::ActorLocationTracker",
    "ray::_AutoscalingCoordinatorActor",
)
RAY_SERVICE_PROGRAMS = ("/raylet", "/gcs_server", "/log_monitor.py", "/monitor.py", "/dashboard.py", "/agent.py",
                        "/runtime_env/agent/main.py")  # fmt: skip
ROLES = ("model actors", "driver", "Assembler", "Ray's services", "other Ray workers", "rest of the machine")


def process_role(command: str, *, driver: bool, new: bool = False) -> str:
    """Which of ROLES a process of this `command` line (its title, for Ray's workers) plays in a run;
    `new`: it started during the run, so it is none of Ray's service programs (a worker that the raylet
    forks carries the raylet's command line until it starts its own program)."""
    if driver:
        return "driver"
    if command.startswith(f"ray::{MODEL_ACTOR}"):
        return "model actors"
    if command.startswith("ray::Assembler"):
        return "Assembler"
    program = not new and any(w.endswith(RAY_SERVICE_PROGRAMS) for w in command.split()[:3])
    if command.startswith(RAY_SERVICE_TITLES) or program:
        return "Ray's services"
    if ray_worker(command):
        return "other Ray workers"  # decoding, finishing and assembling tasks; workers Ray started unused
    return "rest of the machine"


class ProcessCPU:
    """The CPU time each process on the machine used while the block runs: after it, `processes` (pid,
    every command line it was seen with: a Ray worker retitles itself as it takes work, and again as it
    ends; whether it started inside the block; CPU seconds) and `busy_s`, the machine's busy CPU
    seconds. Processes are read every `interval` seconds and keep their last reading when they end,
    so up to `interval` of a process that ends is missed. This process's figure leaves out the
    sampling thread's own CPU."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval

    def __enter__(self) -> Self:
        import threading

        import psutil

        self._before = self._read()
        self._last, self._sampler_s = dict(self._before), 0.0
        self._commands = {key: {command} for key, (_, command) in self._before.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._busy_before = psutil.cpu_times()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        self._stop.set()
        self._thread.join()
        after = psutil.cpu_times()
        self._update()
        self.busy_s = busy_seconds(self._busy_before, after)
        me = os.getpid()
        self.processes = []
        for key, (cpu, _) in self._last.items():
            seconds = cpu - self._before.get(key, (0.0, ""))[0] - (self._sampler_s if key[0] == me else 0.0)
            commands = sorted(self._commands[key])
            self.processes.append(
                {"pid": key[0], "commands": commands, "new": key not in self._before, "cpu_s": seconds}
            )

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()
        self._sampler_s = time.thread_time()

    def _update(self) -> None:
        now = self._read()
        self._last.update(now)
        for key, (_, command) in now.items():
            self._commands.setdefault(key, set()).add(command)

    @staticmethod
    def _read() -> dict[tuple[int, float], tuple[float, str]]:
        import psutil

        out = {}
        for p in psutil.process_iter(["create_time", "cmdline", "name"]):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                command = " ".join(p.info["cmdline"] or []) or p.info["name"] or ""
                out[p.pid, p.info["create_time"]] = (t.user + t.system, command)
        return out


def bench_cpu(args: argparse.Namespace) -> dict[str, object]:
    """Where a pipeline run's CPU goes on this machine (see the module's docstring): the model alone
    first (on a CPU, the pipeline section's per-core ceiling, measured once), then one pipeline run at
    the naive baseline's precision on a local Ray that is up, with every process's CPU read."""

    from model.checkpoint import save_checkpoint
    from model.inference import TileUpscaler

    torch.manual_seed(0)
    device = pick_device(args.device)
    model = DenseIsoViT(variant(args.variant)).to(device).eval()
    runner = TileUpscaler(model, device=device)
    dtype, images = naive_dtype(device, runner.dtype), args.images or 8
    out: dict[str, object] = {"variant": args.variant, "images": images, "dtype": dtype}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = str(root / "model.safetensors")
        save_checkpoint(model, checkpoint)
        photos = write_photos(root / "photos", images)
        if device.type == "cpu":
            ceiling = parallel_ceiling(photos, checkpoint, halo=args.halo, batch_size=runner.batch_size(), dtype=dtype)
            log(f"cpu: model-only ceiling, {dtype}: {ceiling}")
        with ray_up(num_gpus=local_gpus(device)), ProcessCPU() as cpu:
            run = pipeline_run(root / "photos", root / "out", args, checkpoint, memory=False, precision=dtype)
    roles = {role: {"cpu_s": 0.0, "processes": 0, "started": 0} for role in ROLES}
    for p in cpu.processes:
        if p["cpu_s"] >= 0.01 or p["new"]:
            # A process's part is the first in ROLES of those its command lines say (a model actor is
            # titled as one while it works, and may not be when last read).
            parts = (process_role(c, driver=p["pid"] == os.getpid(), new=p["new"]) for c in p["commands"])
            role = roles[min(parts, key=ROLES.index)]
            role["cpu_s"] += p["cpu_s"]
            role["processes"] += 1
            role["started"] += p["new"]
    cores = os.cpu_count() or 1
    out |= {
        "seconds": run["seconds"],
        "cores": cores,
        "cpu_s_available": round(cores * run["seconds"], 2),
        "cpu_s_busy": round(cpu.busy_s, 2),
        "roles": {name: r | {"cpu_s": round(r["cpu_s"], 2)} for name, r in roles.items()},
    }
    if device.type == "cpu":
        # Each of the ceiling's processes is busy all its time: the model's CPU on the run's own tiles.
        at_ceiling = ceiling["processes"] * ceiling["seconds"] * run["tiles"] / ceiling["tiles"]
        out |= {
            "ceiling": ceiling,
            "model_at_ceiling_cpu_s": round(at_ceiling, 2),
            "pipeline_vs_ceiling": round(run["output_mp_per_s"] / ceiling["output_mp_per_s"], 3),
        }
    log(f"cpu: {out}")
    return out


class _Identity:
    """A stage run by an actor pool that changes nothing (warm_up_ray_data)."""

    def __call__(self, batch):
        return batch


def warm_up_ray_data() -> None:
    """Start what Ray Data starts once per cluster (its detached stats and autoscaling actors, and the
    ActorLocationTracker that an actor pool starts), as on a cluster that has run a job before: the
    timed runs then pay only for their own actors."""
    import ray

    ds = ray.data.range(2).map_batches(lambda batch: batch, batch_format="pyarrow")
    ds.map_batches(_Identity, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1)).materialize()


@contextlib.contextmanager
def ray_up(**init: object):
    """A local Ray (`ray.init(**init)`) that is up as a cluster is while the block runs: Ray Data's
    once-per-cluster actors started and Ray's freshly started processes settled; shut down after."""
    import ray

    ray.init(include_dashboard=False, logging_level="ERROR", **init)
    try:
        warm_up_ray_data()
        time.sleep(3)
        yield
    finally:
        ray.shutdown()


def local_gpus(device: torch.device) -> int:
    """The GPUs a local Ray is told of for `device`: those torch sees, as `isosr upscale` starts its
    local Ray (pipeline.run), and none for --device cpu."""
    return torch.cuda.device_count() if device.type == "cuda" else 0


def bench_pipeline(args: argparse.Namespace) -> dict[str, object]:
    """The pipeline against the model-only ceiling at each precision it may run at (the mean of one
    measurement before the pipeline runs and one after), and against the naive baseline. Ray is
    started (and Ray Data's once-per-cluster actors) before anything is timed, as on a running
    cluster; each timed run still starts its own model actors and loads the model in them. Without
    --quick, also one cold run (`isosr upscale` without --address: its own local Ray, started inside
    the time) and the memory runs."""

    from model.checkpoint import save_checkpoint
    from model.inference import TileUpscaler

    torch.manual_seed(0)
    device = pick_device(args.device)
    model = DenseIsoViT(variant(args.variant)).to(device).eval()
    runner = TileUpscaler(model, device=device)  # the dtype and batch size the pipeline's actors choose
    batch_size = runner.batch_size()
    images = args.images or 8
    headline = naive_dtype(device, runner.dtype)
    dtypes = list(dict.fromkeys([runner.dtype, headline]))  # the default, and the naive baseline's
    result: dict[str, object] = {
        "variant": args.variant,
        "images": images,
        "halo": args.halo,
        "batch_size": batch_size,
        "default_dtype": runner.dtype,
        "headline_dtype": headline,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = str(root / "model.safetensors")
        save_checkpoint(model, checkpoint)
        photos = write_photos(root / "photos", images)
        if not args.quick:
            result["cold"] = pipeline_run(root / "photos", root / "out-cold", args, checkpoint, memory=False)
            log(f"pipeline with its own local Ray (isosr upscale without --address): {result['cold']}")
        # The baselines first, on a quiet machine: Ray's own processes would slow them down.
        result["naive"] = naive_run(
            photos, root / "out-naive", model, halo=args.halo, device=args.device, dtype=headline
        )
        log(f"naive baseline: {result['naive']}")

        def ceiling(dtype: str) -> dict[str, float]:
            """The model alone on the pipeline's tiles, laid out as the pipeline's model actors are: one
            process on a GPU, one single-threaded process per core on a CPU (two threads of one process
            were 8 % slower than two processes on a 2-core AMD EPYC without AVX-512, and their time
            moved by up to 28 % between runs, RESULTS.md)."""
            if device.type == "cpu":
                return parallel_ceiling(photos, checkpoint, halo=args.halo, batch_size=batch_size, dtype=dtype)
            return model_ceiling(photos, model, halo=args.halo, batch_size=batch_size, dtype=dtype)

        ceilings = {}
        for dtype in dtypes:
            ceilings[dtype] = ceiling(dtype)
            log(f"model-only ceiling, {dtype}: {ceilings[dtype]}")
        pipelines = {}
        with ray_up(num_gpus=local_gpus(device)):
            for dtype in dtypes:
                dst = root / f"out-{dtype}"
                pipelines[dtype] = pipeline_run(
                    root / "photos", dst, args, checkpoint, memory=False, precision=dtype, timeline=True
                )
                log(f"pipeline, {dtype}, {images} photos: {pipelines[dtype]}")
            if device.type == "cpu" and not args.quick:
                one = model_ceiling(photos, model, halo=args.halo, batch_size=batch_size, dtype=runner.dtype)
                result["ceiling_one_process"] = one
                log(
                    f"model-only ceiling, {runner.dtype}, one process with torch's {torch.get_num_threads()} threads: {one}"
                )
            if not args.quick and args.scale_images > 0:
                large = write_photos(root / "large", images * args.scale_images)
                result["pipeline_memory"] = pipeline_run(root / "photos", root / "out-m", args, checkpoint, memory=True)
                log(f"pipeline with memory sampling, {images} photos: {result['pipeline_memory']}")
                result["pipeline_scaled"] = pipeline_run(root / "large", root / "out-l", args, checkpoint, memory=True)
                log(f"pipeline with memory sampling, {len(large)} photos: {result['pipeline_scaled']}")
        # The ceiling again, after the pipeline, on a quiet machine as before: this machine's speed
        # drifts by up to ~20 % within minutes (the same forward passes, RESULTS.md), so the pipeline
        # is compared with the mean of the measurements on either side of it.
        megapixels = output_mp(photos)
        for dtype in dtypes:
            after = ceiling(dtype)
            log(f"model-only ceiling, {dtype}, after the pipeline: {after}")
            # (Not named `ceiling`, the function above: that name bound to a dict broke the next dtype.)
            both = bracketed(ceilings[dtype], after, megapixels)
            rate = pipelines[dtype]["output_mp_per_s"]
            result["runs"][dtype] = {
                "ceiling": both,
                "pipeline": pipelines[dtype],
                "pipeline_vs_ceiling": round(rate / both["output_mp_per_s"], 3),
                "pipeline_vs_naive": round(rate / result["naive"]["output_mp_per_s"], 3),
            }
            if pipelines[dtype]["time_split"]:
                result["runs"][dtype]["binding_stage"] = binding_stage(pipelines[dtype]["time_split"])
                against_ceiling(pipelines[dtype], both)
        result["max_pixel_difference_vs_naive"] = max_difference(root / "out-naive", root / f"out-{headline}")
    # The headline ratios compare like with like: the pipeline and the ceiling at the naive baseline's
    # precision (float32 on a CPU, bf16 on a GPU). result["runs"] has them at the default precision too.
    result["pipeline_vs_ceiling"] = result["runs"][headline]["pipeline_vs_ceiling"]
    result["pipeline_vs_naive"] = result["runs"][headline]["pipeline_vs_naive"]
    if "pipeline_scaled" in result:
        growth = result["pipeline_scaled"]["peak_memory_mib"] / result["pipeline_memory"]["peak_memory_mib"] - 1
        result["memory_growth"] = round(growth, 3)
    return result


def against_ceiling(run: dict[str, object], ceiling: dict[str, float]) -> None:
    """The run's `time_split` with its model actors' busy time cut in two, where the actors are laid
    out as the ceiling's processes are (as many, an equal share of the tiles each): the model on the
    run's tiles at the ceiling's rate (`model_at_ceiling_s`), and the rest (`slower_than_alone_s`): the
    actors' own work beside the network, and the cores the other stages and Ray took from them."""
    split = run["time_split"]
    if len(split["actors"]) == ceiling["processes"]:
        alone = ceiling["seconds"] * run["tiles"] / ceiling["tiles"]
        split["model_at_ceiling_s"] = round(alone, 2)
        split["slower_than_alone_s"] = round(split["busy_s"] - alone, 2)


def binding_stage(split: dict[str, object]) -> str:
    """The stage that bounds the run's rate, by its model actors: busy 90 % of the time between their
    first piece and their last, they are it; otherwise they waited for pieces from the stages around
    them (decoding before them; finishing and writing after, when Ray Data holds pieces back because
    their outputs pile up)."""
    share = split["busy_s"] / max(split["busy_s"] + split["waiting_s"], 1e-9)
    if share >= 0.9:
        return f"the model (its actors busy {share:.0%} of the time from their first piece to their last)"
    return f"the stages around the model (its actors busy only {share:.0%} of the time from their first piece to their last)"


# --- report ----------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |"] + [f"| {' | '.join(map(str, r))} |" for r in rows]


def markdown(results: dict[str, object]) -> str:
    info = results["machine"]
    cpu = (
        f"{info['cpu']} ({info.get('cpu_family')}; {' '.join(info.get('cpu_features') or []) or 'no AVX2 or AVX-512'})"
    )
    where = f"{info.get('gpu') or cpu}, {info['cores']} cores, torch {info['torch']}, {info['date']}"
    out = [f"Machine: {where}."]
    if "model" in results:
        m = results["model"]
        out += ["", (f"**Model only**, variant `{m['variant']}` ({m['parameters']:,} parameters), {m['gflop_per_tile']} "
                f"GFLOP per 64x64 tile, {m['device']}, {m['seconds_per_row']} s a row:"), ""]  # fmt: skip
        mfu = m["bf16_peak_tflops"] is not None
        out += _table(
            ["dtype", "batch", "tiles/s", "output MP/s (halo 0)", "GFLOP/s"] + (["MFU (bf16 peak)"] if mfu else []),
            [[r["dtype"] + (f", torch.compile ({r['compile_s']} s to compile)" if "compile_s" in r else ""), r["batch"],
              r["tiles_per_s"], r["output_mp_per_s"], r["gflop_per_s"]]
             + ([f"{r['mfu']:.1%}" if "mfu" in r else ""] if mfu else []) for r in m["rows"]],
        )  # fmt: skip
        out += [""] + _table(
            ["halo", "compute factor", "FLOPs per output pixel"],
            [[h, v["compute_factor"], f"{v['flops_per_output_pixel']:,}"] for h, v in m["halos"].items()],
        )
    if "codecs" in results:
        c = results["codecs"]
        out += ["", f"**Codecs**, one thread, {c['image']}:", ""]
        out += _table(
            ["encoder", "encode MP/s per core", "decode MP/s per core", "bytes per pixel"],
            [[r["encoder"], r["encode_mp_per_s"], r["decode_mp_per_s"], r["bytes_per_pixel"]] for r in c["rows"]],
        )
    if "halo" in results:
        h = results["halo"]
        out += ["", f"**Halo**, {h['weights']}, photos {', '.join(h['photos'])}:", ""]
        out += _table(
            ["halo", "tiles", "seconds", "PSNR-Y (dB)", "seam error ratio (mean / worst)"],
            [[r["halo"], r["tiles"], r["seconds"], r["psnr_y"], f"{r['seam_error_ratio']} / {r['worst_seam_error_ratio']}"]
             for r in h["rows"]],
        )  # fmt: skip
    if "skip" in results:
        s = results["skip"]
        out += ["", f"**Content-adaptive skipping**, {s['weights']}, photos {', '.join(s['photos'])}:", ""]
        out += _table(
            ["--skip-detail", "tiles skipped", "seconds", "speed-up", "PSNR-Y lost, mean (dB)", "worst photo (dB)"],
            [[r["skip_detail"], f"{r['tiles_skipped']:.1%}", r["seconds"], f"{r['speed_up']:.2f}x",
              r["mean_psnr_y_loss_db"], r["worst_psnr_y_loss_db"]] for r in s["rows"]],
        )  # fmt: skip
    if "precision" in results:
        r = results["precision"]
        fast = r["dtype"]
        out += ["", f"**{fast} against float32**, {r['weights']}:", ""]
        out += _table(
            ["photo", "PSNR-Y float32", f"PSNR-Y {fast}", "largest pixel difference", "pixels that differ"],
            [[x["photo"], x["psnr_y_float32"], x[f"psnr_y_{fast}"], x["max_difference"], f"{x['share_differing']:.1%}"]
             for x in r["rows"]],
        )  # fmt: skip
    if "pipeline" in results:
        p = results["pipeline"]
        rows = [[f"naive: one process, batch 1, Pillow I/O, {p['naive']['dtype']}", p["naive"]["tiles"],
                 p["naive"]["seconds"], p["naive"]["output_mp_per_s"], "", ""]]  # fmt: skip
        for dtype, r in p["runs"].items():
            c, q = r["ceiling"], r["pipeline"]
            layout = "one process" if c["processes"] == 1 else f"{c['processes']} single-threaded processes"
            label = (f"model only: pre-tiled tensors, {layout}, {dtype} (mean of {c['seconds_before']} s before "
                     f"the pipeline and {c['seconds_after']} s after)")  # fmt: skip
            rows.append([label, c["tiles"], c["seconds"], c["output_mp_per_s"], "", ""])
            rows.append([f"**pipeline, {dtype}**", q["tiles"], q["seconds"], q["output_mp_per_s"],
                         f"**{r['pipeline_vs_ceiling']:.1%}**", f"**{r['pipeline_vs_naive']:.2f}x**"])  # fmt: skip
        if "cold" in p:
            q = p["cold"]
            rows.append([f"pipeline, {p['default_dtype']}, its own local Ray started inside the time", q["tiles"],
                         q["seconds"], q["output_mp_per_s"], "", ""])  # fmt: skip
        if "ceiling_one_process" in p:
            q = p["ceiling_one_process"]
            rows.append([f"model only: one process, torch's threads, {p['default_dtype']}", q["tiles"], q["seconds"],
                         q["output_mp_per_s"], "", ""])  # fmt: skip
        for key in ("pipeline_memory", "pipeline_scaled"):
            if key in p:
                q = p[key]
                rows.append([f"pipeline, {p['default_dtype']}, {q['images']} images, peak memory {q['peak_memory_mib']:,} MiB",
                             q["tiles"], q["seconds"], q["output_mp_per_s"], "", ""])  # fmt: skip
        out += ["", (f"**End to end**, variant `{p['variant']}`, {p['images']} photos, halo {p['halo']}, batch "
                     f"{p['batch_size']}; default precision here {p['default_dtype']}:"), ""]  # fmt: skip
        out += _table(["run", "tiles", "seconds", "output MP/s", "vs ceiling (same dtype)", "vs naive"], rows)
        out += ["", (f"Headline ({p['headline_dtype']} throughout, the naive baseline's precision): pipeline / ceiling "
                     f"**{p['pipeline_vs_ceiling']:.1%}**, pipeline / naive **{p['pipeline_vs_naive']:.2f}x**; largest "
                     f"pixel difference between the pipeline's and the naive baseline's outputs: "
                     f"{p['max_pixel_difference_vs_naive']}.")]  # fmt: skip
        out += time_split_table(p["runs"])
    if "profile" in results:
        r = results["profile"]
        out += [
            "",
            f"**Where the model's time goes**, variant `{r['variant']}`, {r['device']}, {r['dtype']}, batch {r['batch']}:",
            "",
        ]
        mfu = any("mfu" in q for q in r["rows"])
        out += _table(
            ["part", "GFLOP per tile", "ms per batch", "tiles/s", "TFLOP/s"] + (["MFU (bf16 peak)"] if mfu else []),
            [[q["part"], q["gflop_per_tile"], q["ms_per_batch"], q["tiles_per_s"], q["tflop_per_s"]]
             + ([f"{q['mfu']:.1%}"] if mfu else []) for q in r["rows"]],
        )  # fmt: skip
        for how, kernels in r["kernels"].items():
            out += ["", f"Kernels that take the most time, {how} (torch.profiler, self time):", ""]
            out += _table(["kernel", "ms per forward pass", "share", "calls per forward pass"],
                          [[k["name"][:90], k["ms_per_call"], f"{k['share']:.1%}", k["calls_per_forward"]] for k in kernels])  # fmt: skip
    if "actor" in results:
        r = results["actor"]
        out += ["", (f"**A model actor's CPU work a photo beside the network** (the network standing in at no "
                     f"cost), variant `{r['variant']}`, halo {r['halo']}:"), ""]  # fmt: skip
        out += _table(
            ["allocators", "calls at once", "photos", "ms a photo", "CPU ms a photo", "of it system", "page faults a photo"],
            [[{"defaults": "glibc's and Arrow's defaults"}.get(q["environ"], q["environ"]), q["calls_at_once"], q["photos"], q["ms_per_photo"], q["cpu_ms_per_photo"],
              q["system_ms_per_photo"], f"{q['page_faults_per_photo']:,}"] for q in r["runs"]],
        )  # fmt: skip
    if "startup" in results:
        r = results["startup"]
        out += ["", (f"**A run's start beside one model actor on a node of {r['cpus']} CPUs** (every tile on the "
                     f"skip path), variant `{r['variant']}`, {r['images']} photos, one fresh Ray per run:"), ""]  # fmt: skip
        out += _table(
            ["run", "seconds", "until the first piece (before `__init__` + in it)", "worker processes started"],
            [[i + 1, q["seconds"], f"{q['start_s']} ({q['before_init_s']} + {q['init_s']})", q["workers_started"]]
             for i, q in enumerate(r["runs"])],
        )  # fmt: skip
    if "cpu" in results:
        out += cpu_table(results["cpu"])
    if "shards" in results:
        r = results["shards"]
        images = {"noise": "incompressible 512x512 PNGs", "photos": "384x384 JPEG photo crops"}[r["kind"]]
        out += ["", f"**One Parquet shard through the pipeline** ({images}, skip path, JPEG out):", ""]
        out += _table(
            ["shard", "rows", "decoded size", "seconds", "output MP", "peak PSS, all processes",
             "of it private (heaps)", "peak of live objects in Ray's store"],
            [[f"{q['file_bytes'] / 1e6:,.0f} MB", q["rows"], f"{q['decoded_bytes'] / 2**20:,.0f} MiB", q["seconds"],
              q["output_mp"], f"{q['peak_memory_mib']:,} MiB", f"{q['peak_private_mib']:,} MiB",
              f"{q['peak_object_store_mib']:,} MiB"] for q in r["runs"]],
        )  # fmt: skip
    return "\n".join(out)


def cpu_table(r: dict[str, object]) -> list[str]:
    """Markdown: the cpu section, where a run's CPU went, by role."""
    busy = r["cpu_s_busy"]
    out = ["", (f"**Where a pipeline run's CPU went**, variant `{r['variant']}`, {r['images']} photos, {r['dtype']}: "
                f"{r['seconds']} s on {r['cores']} cores, {r['cpu_s_available']} CPU-s, of them {busy} busy:"), ""]  # fmt: skip
    rows = [[name, f"{q['processes']} ({q['started']})", q["cpu_s"], f"{q['cpu_s'] / busy:.1%}"]
            for name, q in r["roles"].items()]  # fmt: skip
    out += _table(["role", "processes (started during the run)", "CPU-s", "of the busy CPU"], rows)
    if "model_at_ceiling_cpu_s" in r:
        actors = r["roles"]["model actors"]["cpu_s"]
        out += ["", (f"The model alone on the run's tiles ({r['ceiling']['processes']} single-threaded processes, "
                     f"{r['ceiling']['seconds']} s): {r['model_at_ceiling_cpu_s']} CPU-s, so the model actors used "
                     f"{actors - r['model_at_ceiling_cpu_s']:.2f} CPU-s beyond it (their start-up and their tiles' "
                     f"slower running beside the rest) and the run's other processes {busy - actors:.2f}; "
                     f"pipeline / this ceiling: {r['pipeline_vs_ceiling']:.1%}.")]  # fmt: skip
    return out


def time_split_table(runs: dict[str, dict]) -> list[str]:
    """Markdown: where each timed pipeline run's time went (`time_split`), and its binding stage."""
    rows = []
    for dtype, r in runs.items():
        q, t = r["pipeline"], r["pipeline"]["time_split"]
        if t:
            cut = f" ({t['model_at_ceiling_s']} + {t['slower_than_alone_s']})" if "model_at_ceiling_s" in t else ""
            start = f" ({t['before_init_s']} + {t['init_s']} + {t['first_piece_wait_s']})" if "init_s" in t else ""
            rows.append([f"pipeline, {dtype}", q["seconds"], f"{t['start_s']}{start}", f"{t['busy_s']}{cut}",
                         t["waiting_s"], t["tail_s"], t["finish_s"], f"{q['cores_busy']:.0%}"])  # fmt: skip
    if not rows:
        return []
    out = ["", ("**Where each pipeline run's time went** (its model actors' pieces in Ray's task events, the mean "
                "over the actors; the parts add up to the run's seconds):"), ""]  # fmt: skip
    out += _table(["run", "seconds", "until the first piece (before the actor's `__init__` + in it + after it)",
                   "running pieces (at the ceiling's rate + beyond it)",
                   "waiting between pieces", "tail", "after the last piece", "cores busy"], rows)  # fmt: skip
    return out + [""] + [f"Binding stage, {d}: {r['binding_stage']}." for d, r in runs.items() if "binding_stage" in r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every section smaller: under 10 minutes on 2 CPU cores")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="write every figure here, with the machine and date")
    parser.add_argument("--markdown", type=Path, help="write the tables for RESULTS.md here (they are printed too)")
    parser.add_argument("--variant", default="full", help="the model for the speed sections (model, pipeline)")
    parser.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--batch-sizes", help="model section (default: 1,4,8,16 on CPU; 1,32,128,512 on a GPU)")
    parser.add_argument("--dtypes", help="model section (default: float32,bfloat16)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="model section: the largest batch again, torch.compile'd as `isosr upscale --compile` runs it",
    )
    parser.add_argument("--images", type=int, help="pipeline, cpu and startup sections: photos (default 8, 8 and 48)")
    parser.add_argument(
        "--scale-images",
        type=int,
        default=4,
        help="pipeline section: the memory run's photos, times --images (0: no memory runs)",
    )
    parser.add_argument("--halo", type=int, default=4, help="pipeline section")
    parser.add_argument(
        "--photos",
        type=Path,
        action="append",
        help="halo and skip sections: a folder of photos, repeatable (default: scikit-image's)",
    )
    parser.add_argument("--shard-mb", type=int, default=1024, help="shards section: the large shard's size (MB)")
    parser.add_argument(
        "--shard-kind",
        choices=("noise", "photos"),
        default="noise",
        help="shards section: incompressible PNGs (decoded size = file size) or JPEG photos (~11x)",
    )
    parser.add_argument("--workdir", help="shards section: where the shards and outputs go (default: the temp dir)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS) - set(EXTRA_SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS + EXTRA_SECTIONS)}")
    run = {
        "model": bench_model,
        "codecs": bench_codecs,
        "halo": bench_halo,
        "skip": bench_skip,
        "precision": bench_precision,
        "pipeline": bench_pipeline,
        "shards": bench_shards,
        "profile": bench_profile,
        "actor": bench_actor,
        "startup": bench_startup,
        "cpu": bench_cpu,
    }
    info = machine()
    results: dict[str, object] = {"machine": info, "quick": args.quick}
    started = time.perf_counter()
    for section in sections:
        results[section] = run[section](args, info) if section in ("model", "profile") else run[section](args)
        log(f"-- {section} done at {time.perf_counter() - started:.0f} s")
    if "pipeline" in results:
        results["pipeline_vs_ceiling"] = results["pipeline"]["pipeline_vs_ceiling"]
        results["pipeline_vs_naive"] = results["pipeline"]["pipeline_vs_naive"]
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = markdown(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
