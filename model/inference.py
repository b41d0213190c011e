"""Running the network on tiles: device, precision and batches, behind the tiler's TileModel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.config import variant, variant_name
from model.network import DenseIsoViT, pick_device, precision


def auto_precision(device: torch.device) -> str:
    """bf16 autocast on GPUs that have it, fp16 on older GPUs, float32 on CPU."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


class TileUpscaler:
    """A TileModel (see model.tiling) around a Dense-Iso-ViT: (N, 3, T, T) float32 numpy tiles in
    [0, 1] -> (N, 3, sT, sT) float32 numpy, unclamped."""

    def __init__(self, model: DenseIsoViT, *, device: torch.device | str | None = None, dtype: str = "auto") -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.dtype = auto_precision(self.device) if dtype == "auto" else dtype
        self.model = model.to(self.device).eval()
        self.tile_size = model.config.tile_size
        self.scale = model.config.scale

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32)).to(self.device)
        with precision(self.device, self.dtype):
            y = self.model(x)
        return y.float().cpu().numpy()


@dataclass(frozen=True)
class ModelSource:
    """Where the weights came from: `version` is the checkpoint's sha256, or 'untrained:<variant>'."""

    model: DenseIsoViT
    version: str
    description: str


def load_model(checkpoint: str | None, *, untrained_variant: str | None = None) -> ModelSource:
    """The checkpoint at `checkpoint`; else, with `untrained_variant`, that variant untrained (its
    last layer is 0, so its output is exactly bilinear upscaling); else the shipped default weights,
    or the untrained full network where they are missing (a checkout without model/weights/)."""
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
