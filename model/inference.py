"""Running the network on tiles: device, precision and batches, behind the tiler's TileModel.

The fast paths, and why each is there:
- bf16 autocast on GPUs (fp16 on GPUs without bf16) and on CPUs with native bf16 instructions
  (AVX512-BF16 or AMX: ~1.8x faster there, within 1-2 levels of 255 of float32 on real photos,
  RESULTS.md); float32 on other CPUs, where bf16 is emulated and slower;
- attention through scaled_dot_product_attention (model/network.py: flash / memory-efficient
  kernels where the device has them);
- on CUDA: channels-last weights and inputs for the convolutions, inputs copied from pinned host
  memory without blocking, and outputs copied back the same way;
- `compile`: torch.compile of the network, opt-in (minutes of compiling pay off on long GPU runs),
  for fixed batch shapes: a batch is padded to one of a few sizes (compiled_size), since every new
  shape compiles again (~17 s on an H200, 8-15 s on a CPU) and after 8 of them torch stops compiling;
- a batch that runs out of GPU memory is split in half and run again, down to one tile: every tile
  is computed, none silently wrong or missing; the smaller size is kept for later batches;
- content-adaptive skipping: a tile with less detail than `skip_detail` (flat sky, a blank margin,
  an opaque alpha plane) takes the network's bilinear skip path alone, which is what the trained
  network barely changes; RESULTS.md has the speed-up against the PSNR lost on real photos.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint
from model.config import variant, variant_name
from model.network import DenseIsoViT, pick_device, precision
from model.tiling import DEFAULT_BATCH_SIZE

log = logging.getLogger(__name__)

GPU_MEMORY_SHARE = 0.6  # of the free GPU memory, for the activations of one forward batch
MAX_AUTO_BATCH = 1024
COMPILED_SIZES = 5  # batch shapes a compiled network runs: the largest batch and 4 halvings of it


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16), from Linux's
    /proc/cpuinfo; False where that cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def auto_precision(device: torch.device) -> str:
    """bf16 autocast on GPUs that have it (fp16 on older GPUs) and on CPUs with native bf16;
    float32 on other CPUs."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def compiled_size(n: int, largest: int) -> int:
    """The batch that `n` tiles run as through a compiled network whose callers send at most `largest`:
    the smallest of `largest`, `largest / 2`, ... (COMPILED_SIZES sizes, rounded up) that holds them,
    padded with blank tiles. Why: with dynamic=False every new shape compiles again, and a pipeline
    call's last batch has any size; with dynamic=True torch still compiled again for batches of 1 and
    16 (torch 2.13, CPU) and ran 3.5 % slower. A batch of n tiles runs as at most max(2n, largest / 16)."""
    sizes = sorted({-(-largest // 2**k) for k in range(COMPILED_SIZES)})
    return next((size for size in sizes if size >= n), n)


def tile_detail(tiles: np.ndarray) -> np.ndarray:
    """(N, C, T, T) tiles in [0, 1] -> (N,) detail in 8-bit levels: the mean absolute difference
    between each pixel and its 3x3 neighbourhood mean, on the channel that has the most.

    Why this measure: what the network adds to bilinear upscaling is high-frequency detail, so a
    tile with little of it is one the network barely changes. A tile's range (max - min) was tried
    first and skips nearly nothing on photos: one speck, or sensor noise, spans many levels.
    """
    high_pass = tiles - ndimage.uniform_filter(tiles, size=(1, 1, 3, 3), mode="nearest")
    return np.abs(high_pass).mean(axis=(2, 3)).max(axis=1) * 255.0


class TileUpscaler:
    """A TileModel (see model.tiling) around a Dense-Iso-ViT: (N, 3, T, T) float32 numpy tiles in
    [0, 1] -> (N, 3, sT, sT) float32 numpy, unclamped.

    `skip_detail`: a tile whose tile_detail is at most this takes the skip path alone (0: every
    tile runs the network). `compile`: torch.compile the network. `tiles_run` and `tiles_skipped` count tiles."""

    def __init__(
        self,
        model: DenseIsoViT,
        *,
        device: torch.device | str | None = None,
        dtype: str = "auto",
        skip_detail: float = 0.0,
        compile: bool = False,
    ) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.dtype = auto_precision(self.device) if dtype == "auto" else dtype
        self.cuda = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.compiled = compile
        self.forward = torch.compile(self.model, dynamic=False) if compile else self.model
        self.largest_batch: int | None = None
        self.tile_size = model.config.tile_size
        self.scale = model.config.scale
        self.skip_detail = skip_detail
        self.max_batch: int | None = None  # lowered when a batch runs out of GPU memory
        self.tiles_run = 0
        self.tiles_skipped = 0

    def batch_size(self) -> int:
        """Tiles per forward pass for this device: DEFAULT_BATCH_SIZE on CPU; on a GPU, as many as
        GPU_MEMORY_SHARE of its free memory holds, from the memory one batch of 8 takes."""
        if not self.cuda:
            return DEFAULT_BATCH_SIZE
        probe = 8
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self(np.zeros((probe, self.model.config.in_channels, self.tile_size, self.tile_size), np.float32), count=False)
        per_tile = max(1, (torch.cuda.max_memory_allocated(self.device) - before) // probe)
        free, _ = torch.cuda.mem_get_info(self.device)
        size = int(GPU_MEMORY_SHARE * free // per_tile)
        return max(probe, min(MAX_AUTO_BATCH, size // probe * probe))

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray, *, count: bool = True) -> np.ndarray:
        tiles = np.ascontiguousarray(tiles, dtype=np.float32)
        n, c, t, _ = tiles.shape
        flat = tile_detail(tiles) <= self.skip_detail if self.skip_detail > 0 else np.zeros(n, dtype=bool)
        parts: list[tuple[np.ndarray, np.ndarray]] = []  # (tile indices, their outputs)
        if flat.any():
            parts.append((np.flatnonzero(flat), self._skip_path(tiles[flat])))
        busy = np.flatnonzero(~flat)
        start = 0
        while start < len(busy):
            size = min(len(busy) - start, self.max_batch or len(busy))
            chosen = busy[start : start + size]
            try:
                parts.append((chosen, self._network(tiles[chosen])))
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                self.max_batch = size // 2
                if self.cuda:
                    torch.cuda.empty_cache()
                log.warning(
                    "out of GPU memory on %d tiles; running batches of at most %d from now on", size, self.max_batch
                )
                continue
            start += size
        if count:
            self.tiles_skipped += int(flat.sum())
            self.tiles_run += len(busy)
        if len(parts) == 1:  # the usual case, every tile in one forward pass: no copy
            return parts[0][1]
        out = np.empty((n, c, t * self.scale, t * self.scale), dtype=np.float32)
        for chosen, outputs in parts:
            out[chosen] = outputs
        return out

    def _skip_path(self, tiles: np.ndarray) -> np.ndarray:
        """The network's own skip path (bilinear x scale), in float32 on the CPU."""
        return F.interpolate(
            torch.from_numpy(tiles), scale_factor=self.scale, mode="bilinear", align_corners=False
        ).numpy()

    def _network(self, tiles: np.ndarray) -> np.ndarray:
        n = len(tiles)
        if self.compiled:
            self.largest_batch = max(self.largest_batch or 0, n)
            padded = compiled_size(n, min(self.largest_batch, self.max_batch or self.largest_batch))
            if padded > n:
                tiles = np.concatenate([tiles, np.zeros((padded - n, *tiles.shape[1:]), tiles.dtype)])
        x = torch.from_numpy(tiles)
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with precision(self.device, self.dtype):
            y = self.forward(x)
        y = y[:n]
        if not self.cuda:
            return y.float().numpy()
        host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(y, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy()


@dataclass(frozen=True)
class ModelSource:
    """Where the weights came from: `version` is the checkpoint's sha256, or 'untrained:<variant>'."""

    model: DenseIsoViT
    version: str
    description: str


def load_model(
    checkpoint: str | None, *, untrained_variant: str | None = None, sha256: str | None = None
) -> ModelSource:
    """The checkpoint at `checkpoint`; else, with `untrained_variant`, that variant untrained (its
    last layer is 0, so its output is exactly bilinear upscaling); else the shipped default weights,
    or the untrained full network where they are missing (a checkout without model/weights/).

    `sha256`: the digest the checkpoint's bytes must have (--checkpoint-sha256); CheckpointError,
    naming the file and both digests, when they do not."""
    source = _load_model(checkpoint, untrained_variant)
    if sha256 is not None and source.version != sha256.lower():
        raise CheckpointError(
            checkpoint or str(DEFAULT_CHECKPOINT),
            f"its sha256 is {source.version}, but --checkpoint-sha256 asks for {sha256.lower()}: "
            "the file changed, or it is not the one meant; nothing was run",
        )
    return source


def _load_model(checkpoint: str | None, untrained_variant: str | None) -> ModelSource:
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        return ModelSource(ckpt.model, ckpt.sha256, f"checkpoint {checkpoint}")
    if untrained_variant is None and DEFAULT_CHECKPOINT.exists():
        ckpt = load_checkpoint(str(DEFAULT_CHECKPOINT))
        name = variant_name(ckpt.config)
        return ModelSource(ckpt.model, ckpt.sha256, f"default weights ({name!r} variant, {DEFAULT_CHECKPOINT.name})")
    name = untrained_variant or "full"
    why = "as asked" if untrained_variant else f"{DEFAULT_CHECKPOINT} is missing"
    return ModelSource(
        DenseIsoViT(variant(name)),
        f"untrained:{name}",
        f"untrained {name!r} network ({why}: output equals bilinear x4)",
    )
