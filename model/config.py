"""Dense-Iso-ViT configuration: one frozen dataclass, named variants in one dict.

The config travels inside every checkpoint (as JSON in the safetensors metadata), so loading a
checkpoint rebuilds exactly the network that was saved.

Choices the model card leaves open, and what this project chose (full variant: 23,855,563
parameters, 91.0 MiB in float32, against the card's 23.8 M and 90.99 MB):
- GDFN hidden width: 4 x the stage's embed dim (the usual ViT feed-forward ratio).
- Norms: pre-norm LayerNorm before attention and before the GDFN in every block, plus one
  LayerNorm on each stage's output before the dense concat (keeps the four stages on one scale).
- Positional encoding: one learned absolute embedding over the fixed 16x16 token grid, added once
  after the patch embedding (the grid never changes, so nothing needs to interpolate it).
- Head: a 3x3 fusion conv 1120 -> 384, then four x2 sub-pixel stages (3x3 conv to 4*C', PixelShuffle,
  GELU) of widths 184, 96, 48, 24, then a 3x3 conv 24 -> 3. Roughly halving the width at each
  doubling keeps every stage's cost about equal and the whole head near the body's (about 7 of
  17 GFLOP per tile), where a constant 192-wide head would cost ~60 GFLOP at 256x256. The first
  width, 184 rather than 192, lands the parameter count on the card's.
- The last conv starts at zero, so an untrained network is exactly its bilinear skip.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


def _require_positive(name: str, values: object, kind: type | tuple[type, ...]) -> None:
    """A checkpoint's JSON can hold anything: fail here, by field name, not deep inside torch."""
    if (
        not isinstance(values, tuple)
        or not values
        or any(isinstance(v, bool) or not isinstance(v, kind) or v <= 0 for v in values)
    ):
        raise ValueError(f"{name} must be positive numbers ({kind}), got {values!r}")


@dataclass(frozen=True, kw_only=True)
class DenseIsoViTConfig:
    """Everything needed to build a Dense-Iso-ViT. Validated on construction."""

    tile_size: int = 64  # LR tile side the network takes; the token grid is tile_size / patch_size
    patch_size: int = 4
    in_channels: int = 3
    embed_dims: tuple[int, ...] = (192, 256, 288, 384)
    num_heads: tuple[int, ...] = (6, 8, 6, 8)
    depths: tuple[int, ...] = (3, 3, 3, 3)
    gdfn_expansion: float = 4.0
    fusion_channels: int = 384
    upsample_channels: tuple[int, ...] = (184, 96, 48, 24)  # one x2 PixelShuffle stage each
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if not isinstance(self.qkv_bias, bool):
            raise TypeError(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        for name in ("tile_size", "patch_size", "in_channels", "fusion_channels"):
            _require_positive(name, (getattr(self, name),), int)
        for name in ("embed_dims", "num_heads", "depths", "upsample_channels"):
            _require_positive(name, getattr(self, name), int)
        for name in ("gdfn_expansion", "layer_norm_eps"):
            _require_positive(name, (getattr(self, name),), (int, float))
        stages = len(self.embed_dims)
        if not (len(self.num_heads) == len(self.depths) == stages):
            raise ValueError(
                f"embed_dims, num_heads and depths must have one entry per stage; got "
                f"{len(self.embed_dims)}, {len(self.num_heads)}, {len(self.depths)}"
            )
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed dim {dim} is not divisible by its {heads} heads")
        if self.tile_size % self.patch_size:
            raise ValueError(f"tile_size {self.tile_size} is not a multiple of patch_size {self.patch_size}")
        if 2 ** len(self.upsample_channels) % self.patch_size:
            raise ValueError(
                f"{len(self.upsample_channels)} x2 upsample stages cannot undo patch size {self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        """Side of the constant token grid (16 for the card's 64x64 tiles with patch 4)."""
        return self.tile_size // self.patch_size

    @property
    def scale(self) -> int:
        """Output pixels per input pixel along each side (4 for the card)."""
        return 2 ** len(self.upsample_channels) // self.patch_size

    @property
    def dense_channels(self) -> int:
        """Width of the dense concat of all stage outputs (1120 for the card)."""
        return sum(self.embed_dims)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DenseIsoViTConfig:
        """Rebuild a config; unknown or missing-but-required fields raise ValueError/TypeError."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise TypeError(f"config JSON must be an object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; known fields are {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**values)


VARIANTS: dict[str, DenseIsoViTConfig] = {
    # The card's network: 16x16 tokens, dims [192, 256, 288, 384], heads [6, 8, 6, 8], depths 3 each.
    "full": DenseIsoViTConfig(),
    # Same token grid, dense concat and GDFN with narrower stages and a lighter head: 2.47 M
    # parameters, ~25 training samples/s (bf16) on 2 CPU cores where "full" manages ~3. Trainable
    # without a GPU, so the shipped default weights can exist before a GPU run does.
    "small": DenseIsoViTConfig(
        embed_dims=(96, 128, 128, 160),
        num_heads=(3, 4, 4, 5),
        depths=(2, 2, 2, 2),
        gdfn_expansion=2.0,
        fusion_channels=128,
        upsample_channels=(64, 32, 16, 16),
    ),
    # Same architecture and I/O contract, small enough for fast CPU tests.
    "tiny": DenseIsoViTConfig(
        embed_dims=(16, 24, 24, 32),
        num_heads=(2, 2, 2, 2),
        depths=(1, 1, 1, 1),
        gdfn_expansion=2.0,
        fusion_channels=32,
        upsample_channels=(16, 16, 8, 8),
    ),
}


def variant(name: str) -> DenseIsoViTConfig:
    """The named variant's config; an unknown name raises ValueError listing the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; choose one of {sorted(VARIANTS)}") from None


def variant_name(config: DenseIsoViTConfig) -> str:
    """The name of the variant `config` is, or "custom"."""
    return next((name for name, c in VARIANTS.items() if c == config), "custom")
