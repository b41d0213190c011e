"""Train Dense-Iso-ViT on Ray Train, and evaluate checkpoints against bicubic and Lanczos.

    python jobs/train.py train --data URI/train --val URI/val --storage URI [--name NAME]
                               [--variant small] [--steps 6000] [--batch-size 16] [--lr 6e-4]
                               [--workers 1] [--gpu] [--precision auto] [--export URI] ...
    python jobs/train.py evaluate CHECKPOINT --val URI/val [--max-side N]

`train` runs a TorchTrainer (DDP across `--workers` workers, one GPU each with `--gpu`; CPU
otherwise). Ray Data streams random 256x256 crops of the images under `--data` (any fsspec URI;
crops per image in proportion to its area, random flips and 90-degree rotations) into the workers;
each batch is degraded on the worker with the antialiased bicubic x4 the quality checks use
(model.metrics.bicubic_downscale) and quantised to 8 bits like a real input. L1 loss, AdamW with
linear warm-up then cosine decay, bf16 autocast on GPU, an EMA of the weights. Every
`--checkpoint-every` steps rank 0 writes a checkpoint through Ray Train to STORAGE/NAME/:
`model.safetensors` (the EMA weights with their config: `isosr upscale --checkpoint` takes it) and
`train_state.pt` (raw weights, optimizer state, step; read back with torch.load(weights_only=True),
which unpickles nothing but tensors and plain containers). Running the same command again resumes
from the latest checkpoint. Every `--val-every` steps the EMA weights upscale the held-out photos
under `--val` through the tiler and PSNR (RGB and Y, BasicSR conventions) is logged beside bicubic's.
With `--export URI` the final EMA weights are also written there in float16.

`evaluate` scores one checkpoint on whole held-out photos (or centre crops of `--max-side` px).
Build the photo set with jobs/prepare_data.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import variant, variant_name
from model.inference import TileUpscaler
from model.metrics import bicubic_downscale, bicubic_downscale_array, modcrop, psnr
from model.network import DenseIsoViT, precision
from model.tiling import DEFAULT_HALO, upscale_array
from pipeline import images, storage
from pipeline.quality import bicubic_upscale, colour_8bit

SCALE = 4
BORDER = 4  # px cropped from each side before PSNR, BasicSR's crop_border for x4
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class Recipe:
    """Everything a run's result depends on; logged at start and stored with every checkpoint."""

    data: str
    val: str | None
    variant: str = "small"
    init: str | None = None  # fine-tune: start from this checkpoint's weights (its config wins over variant)
    steps: int = 6000
    batch_size: int = 16  # per worker
    crop: int = 256  # HR crop side; the LR input is crop / 4 = one 64x64 tile
    lr: float = 6e-4
    min_lr: float = 1e-5
    warmup: int = 300
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    # Per-parameter gradients of an L1 loss on [0, 1] pixels reach 1e-9 in the head and body while
    # the residual is still near zero; Adam's usual eps of 1e-8 would swamp them and stall them.
    adam_eps: float = 1e-12
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"  # bf16 autocast on GPU, float32 on CPU unless asked
    val_every: int = 500
    val_max_side: int = 1024  # centre crops this big during training; `evaluate` does whole photos
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0


def learning_rate(step: int, r: Recipe) -> float:
    """Linear warm-up to r.lr over r.warmup steps, then cosine decay to r.min_lr at r.steps."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    progress = min(1.0, (step - r.warmup) / max(1, r.steps - r.warmup))
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * progress))


# --- data ------------------------------------------------------------------------------------------


def load_rgb(uri: str) -> np.ndarray:
    """An image file as HxWx3 uint8 (grey, alpha and 16-bit folded the way the quality checks do)."""
    return colour_8bit(images.decode(storage.read_bytes(uri), name=uri).pixels)


class CropSampler:
    """Random crop x flip x 90-degree-rotation samples of in-memory photos, each photo drawn with
    probability in proportion to its area (so a large photo is not undersampled). Photos smaller
    than a crop are left out by the caller."""

    def __init__(self, photos: list[np.ndarray], *, crop: int, seed: int) -> None:
        self.photos, self.crop = photos, crop
        areas = np.array([p.shape[0] * p.shape[1] for p in photos], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> np.ndarray:
        """(size, crop, crop, 3) uint8."""
        rng, c = self.rng, self.crop
        out = np.empty((size, c, c, 3), np.uint8)
        for i, k in enumerate(rng.choice(len(self.photos), size=size, p=self.weights)):
            photo = self.photos[k]
            y, x = rng.integers(0, photo.shape[0] - c + 1), rng.integers(0, photo.shape[1] - c + 1)
            hr = photo[y : y + c, x : x + c]
            if rng.random() < 0.5:
                hr = hr[:, ::-1]
            out[i] = np.rot90(hr, k=int(rng.integers(4)))
        return out


def degrade(hr: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> the x4 LR input, on the 8-bit grid a real image has."""
    return torch.round(bicubic_downscale(hr, SCALE) * 255) / 255


# --- validation ------------------------------------------------------------------------------------


@dataclass
class Pair:
    name: str
    hr: np.ndarray  # HxWx3 uint8, sides multiples of 4
    lr: np.ndarray  # the degraded input


def validation_pairs(val: str, max_side: int | None = None) -> list[Pair]:
    """Held-out photos (optionally centre-cropped to max_side) and their degraded inputs."""
    pairs = []
    for f in storage.list_inputs(val):
        hr = load_rgb(f.uri)
        if max_side:
            h, w = (min(side, max_side) for side in hr.shape[:2])
            y0, x0 = (hr.shape[0] - h) // 2, (hr.shape[1] - w) // 2
            hr = hr[y0 : y0 + h, x0 : x0 + w]
        hr = np.ascontiguousarray(modcrop(hr, SCALE))
        pairs.append(Pair(f.key, hr, bicubic_downscale_array(hr, SCALE)))
    if not pairs:
        raise SystemExit(f"no validation images under {val}")
    return pairs


def scores(sr: np.ndarray, hr: np.ndarray) -> tuple[float, float]:
    return psnr(sr, hr, crop_border=BORDER), psnr(sr, hr, crop_border=BORDER, y_channel=True)


def lanczos_upscale(lr: np.ndarray) -> np.ndarray:
    h, w = lr.shape[:2]
    return np.asarray(Image.fromarray(lr).resize((w * SCALE, h * SCALE), Image.LANCZOS))


def baselines(pairs: list[Pair]) -> dict[str, float]:
    """Mean PSNR (RGB, Y) of bicubic and Lanczos upscaling on the pairs."""
    out: dict[str, float] = {}
    for label, up in (("bicubic", bicubic_upscale), ("lanczos", lanczos_upscale)):
        rgb, y = zip(*(scores(up(p.lr), p.hr) for p in pairs))
        out[f"val_psnr_{label}"], out[f"val_psnr_y_{label}"] = float(np.mean(rgb)), float(np.mean(y))
    return out


def evaluate(
    model: DenseIsoViT, pairs: list[Pair], *, device: torch.device, dtype: str = "float32"
) -> dict[str, object]:
    """Mean PSNR (RGB, Y) of the model through the tiler (default halo), and per photo."""
    upscaler = TileUpscaler(model, device=device, dtype=dtype)
    per_image = {}
    for p in pairs:
        sr = upscale_array(p.lr, upscaler, halo=DEFAULT_HALO)
        rgb, y = scores(sr, p.hr)
        bic_y = scores(bicubic_upscale(p.lr), p.hr)[1]
        per_image[p.name] = {"psnr": rgb, "psnr_y": y, "gain_y_vs_bicubic": y - bic_y}
    return {
        "val_psnr": float(np.mean([v["psnr"] for v in per_image.values()])),
        "val_psnr_y": float(np.mean([v["psnr_y"] for v in per_image.values()])),
        "per_image": per_image,
    }


# --- the training loop (runs in every Ray Train worker) --------------------------------------------


def train_step(
    model: torch.nn.Module,
    ema: DenseIsoViT,
    optimizer: torch.optim.Optimizer,
    hr: torch.Tensor,
    *,
    step: int,
    recipe: Recipe,
    dtype: str,
) -> float:
    """One optimisation step on a (B, crop, crop, 3) uint8 batch of HR crops; returns the L1 loss.
    Degrades on the batch's device, sets the scheduled learning rate, clips, updates the EMA."""
    hr = hr.permute(0, 3, 1, 2).float().div_(255)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, recipe)
    with precision(hr.device, dtype):
        out = model(degrade(hr))
    loss = F.l1_loss(out.float(), hr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    optimizer.step()
    with torch.no_grad():
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))  # a young EMA follows closely
        for e, p in zip(ema.parameters(), _unwrap(model).parameters()):
            e.lerp_(p.detach(), 1 - decay)
    return float(loss.detach())


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=recipe.betas, eps=recipe.adam_eps, weight_decay=recipe.weight_decay
    )


def _unwrap(model: torch.nn.Module) -> DenseIsoViT:
    return model.module if hasattr(model, "module") else model


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    recipe = Recipe(**{**config["recipe"], "betas": tuple(config["recipe"]["betas"])})
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(recipe.seed + rank)
    device = ray.train.torch.get_device()
    dtype = recipe.precision
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"

    net = load_checkpoint(recipe.init).model if recipe.init else DenseIsoViT(variant(recipe.variant))
    ema = copy.deepcopy(net).requires_grad_(False).to(device)
    optimizer = make_optimizer(net, recipe)
    step = 0
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
            ema_state = load_checkpoint(str(Path(folder) / MODEL_FILE)).model.state_dict()
        net.load_state_dict(state["model"])
        ema.load_state_dict(ema_state)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if rank == 0:
            print(f"resumed from {resumed.path} at step {step}", flush=True)
    model = ray.train.torch.prepare_model(net)  # to the worker's device; DDP when there are several

    pairs = validation_pairs(recipe.val, recipe.val_max_side) if rank == 0 and recipe.val else []
    reference = baselines(pairs) if pairs else {}
    if reference:
        print(
            "baselines on the validation crops: " + json.dumps({k: round(v, 3) for k, v in reference.items()}),
            flush=True,
        )

    # Each worker holds its share of the photos, decoded, and cuts its own random crops: measured
    # on 2 cores, streaming crops through Ray Data fed the model 6.5 samples/s where this feeds 24.
    world = context.get_world_size()
    uris = config["uris"][rank::world] or config["uris"]  # more workers than photos: all share them
    photos = [p for p in (load_rgb(u) for u in uris) if min(p.shape[:2]) >= recipe.crop]
    if not photos:
        raise ValueError(f"no training image of at least {recipe.crop}x{recipe.crop} px among {len(uris)}")
    sampler = CropSampler(photos, crop=recipe.crop, seed=recipe.seed * 1000 + rank * 100 + step)
    window_loss, window_count, window_start = 0.0, 0, time.perf_counter()
    while step < recipe.steps:
        hr = torch.from_numpy(sampler.batch(recipe.batch_size)).to(device)
        loss = train_step(model, ema, optimizer, hr, step=step, recipe=recipe, dtype=dtype)
        step += 1
        window_loss += loss
        window_count += 1

        metrics: dict[str, object] = {"step": step}
        if step % recipe.log_every == 0 or step == recipe.steps:
            elapsed = time.perf_counter() - window_start
            metrics |= {
                "loss": window_loss / window_count,
                "lr": learning_rate(step - 1, recipe),
                "samples_per_s": window_count * recipe.batch_size * context.get_world_size() / elapsed,
            }
            if rank == 0:
                print(
                    f"step {step}/{recipe.steps}  loss {metrics['loss']:.5f}  lr {metrics['lr']:.2e}  "
                    f"{metrics['samples_per_s']:.1f} samples/s",
                    flush=True,
                )
            window_loss, window_count, window_start = 0.0, 0, time.perf_counter()
        if pairs and (step % recipe.val_every == 0 or step == recipe.steps):
            result = evaluate(ema, pairs, device=device)  # the pipeline's precision
            metrics |= reference | {k: v for k, v in result.items() if k != "per_image"}
            print(
                f"step {step}: validation PSNR-Y {result['val_psnr_y']:.3f} dB "
                f"(bicubic {reference['val_psnr_y_bicubic']:.3f}, gain "
                f"{result['val_psnr_y'] - reference['val_psnr_y_bicubic']:+.3f} dB), "
                f"RGB {result['val_psnr']:.3f} dB",
                flush=True,
            )
        if step % recipe.checkpoint_every == 0 or step == recipe.steps:
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(ema.cpu(), Path(folder) / MODEL_FILE)
                    ema.to(device)
                    state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step}
                    torch.save(state, Path(folder) / STATE_FILE)
                    (Path(folder) / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=checkpoint)
        elif len(metrics) > 1:
            ray.train.report(metrics)


# --- the driver ------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> int:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    # Ray Train runs the loop in a folder of its own, where a relative path would name nothing: every
    # local path is made absolute here.
    init = args.init and storage.absolute(args.init)
    # A bad checkpoint, or an unknown variant name, fails here, before Ray starts. A fine-tuned model
    # is the checkpoint's variant, whatever --variant says: the recipe logged and stored says so.
    if init:
        model_variant = variant_name(load_checkpoint(init).config)
    else:
        variant(args.variant)
        model_variant = args.variant
    recipe = Recipe(
        data=storage.absolute(args.data),
        val=args.val and storage.absolute(args.val),
        variant=model_variant,
        init=init,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=min(args.warmup, max(1, args.steps // 10)),
        precision=args.precision,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        val_max_side=args.val_max_side,
        seed=args.seed,
    )
    inputs = storage.list_inputs(recipe.data)
    if not inputs:
        raise SystemExit(f"no images under {recipe.data}")
    what = f"fine-tuning {recipe.init}" if recipe.init else f"training {recipe.variant!r}"
    print(f"{what} on {len(inputs)} images under {recipe.data}", flush=True)
    print("recipe: " + json.dumps(asdict(recipe)), flush=True)

    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=True)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if args.gpu:
        per_worker = {"CPU": args.cpus_per_worker or 4, "GPU": 1}
    else:
        per_worker = {"CPU": args.cpus_per_worker or max(1.0, cpus // args.workers)}
    threads = max(1, math.ceil(per_worker["CPU"]))

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"recipe": asdict(recipe), "threads": threads, "uris": [f.uri for f in inputs]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=args.name,
            storage_path=storage.absolute(args.storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise SystemExit("training ended without a checkpoint")
    print(f"final checkpoint: {result.checkpoint.path}/{MODEL_FILE}", flush=True)
    if args.export:
        with result.checkpoint.as_directory() as folder:
            final = load_checkpoint(str(Path(folder) / MODEL_FILE)).model
        sha = save_checkpoint(final, args.export, dtype=torch.float16)
        print(f"exported the EMA weights in float16 to {args.export} (sha256 {sha})", flush=True)
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(args.checkpoint)
    pairs = validation_pairs(args.val, args.max_side)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    result = evaluate(checkpoint.model, pairs, device=device, dtype=args.precision) | baselines(pairs)
    result |= {
        "checkpoint": args.checkpoint,
        "sha256": checkpoint.sha256,
        "images": len(pairs),
        "gain_y_vs_bicubic": result["val_psnr_y"] - result["val_psnr_y_bicubic"],
        "gain_y_vs_lanczos": result["val_psnr_y"] - result["val_psnr_y_lanczos"],
        "seconds": time.perf_counter() - start,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        storage.write_atomic(args.json, text.encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = Recipe(data="", val=None)

    t = sub.add_parser("train", help="train (or resume) a run")
    t.add_argument("--data", required=True, help="folder/URI of training images")
    t.add_argument("--val", help="folder/URI of held-out validation images")
    t.add_argument("--storage", required=True, help="folder/URI for Ray Train's run folder (checkpoints)")
    t.add_argument("--name", default="dense-iso-vit", help="run name; the same name resumes (default %(default)s)")
    t.add_argument("--variant", default=defaults.variant, help="model variant (default %(default)s)")
    t.add_argument("--init", metavar="URI", help="fine-tune from this checkpoint (its config replaces --variant)")
    t.add_argument("--steps", type=int, default=defaults.steps)
    t.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per worker")
    t.add_argument("--lr", type=float, default=defaults.lr)
    t.add_argument("--warmup", type=int, default=defaults.warmup)
    t.add_argument("--precision", default=defaults.precision, choices=["auto", "float32", "bfloat16", "float16"])
    t.add_argument("--val-every", type=int, default=defaults.val_every)
    t.add_argument("--val-max-side", type=int, default=defaults.val_max_side)
    t.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    t.add_argument("--log-every", type=int, default=defaults.log_every)
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--workers", type=int, default=1, help="Ray Train workers (one GPU each with --gpu)")
    t.add_argument("--gpu", action="store_true", help="train on GPUs")
    t.add_argument(
        "--cpus-per-worker", type=float, help="CPUs per worker (default: 4 with --gpu, else all CPUs / workers)"
    )
    t.add_argument("--address", help="Ray cluster address (default: start a local one)")
    t.add_argument("--export", help="also write the final EMA weights here in float16")

    e = sub.add_parser("evaluate", help="PSNR of a checkpoint on held-out photos vs bicubic and Lanczos")
    e.add_argument("checkpoint")
    e.add_argument("--val", required=True)
    e.add_argument("--max-side", type=int, help="centre-crop photos to this many px (default: whole)")
    e.add_argument("--device")
    e.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--json", help="also write the result here")

    args = parser.parse_args(argv)
    return train(args) if args.command == "train" else evaluate_command(args)


if __name__ == "__main__":
    sys.exit(main())
