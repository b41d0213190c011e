"""Dense-Iso-ViT: a pure vision transformer for x4 super-resolution (see model/config.py and the
model card). A (B, 3, 64, 64) tile in [0, 1] comes out as (B, 3, 256, 256).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.config import DenseIsoViTConfig


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out; the test oracle for the fused path."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, N, N)
    return scores.softmax(dim=-1) @ v  # (B, h, N, d)


class Attention(nn.Module):
    """Global multi-head self-attention over all tokens of the grid, through
    scaled_dot_product_attention (flash / memory-efficient kernels where the device has them)."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        if fused:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = attention_reference(q, k, v)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(y)


class GDFN(nn.Module):
    """Gated depthwise feed-forward: out_proj(path_1(a) * gelu(path_2(b))), with a, b the two halves
    of g_proj's output laid out on the token grid.

    The card's path_1 and path_2 are held as one depthwise conv over both halves: a depthwise conv
    treats every channel on its own, so this is the same maths in one kernel launch instead of two.
    """

    def __init__(self, *, dim: int, hidden: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.g_proj = nn.Linear(dim, 2 * hidden)
        self.paths = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.out_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = self.g_proj(x).transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # (B, 2H, g, g)
        a, b = self.paths(h).chunk(2, dim=1)  # each (B, H, g, g)
        y = (a * F.gelu(b)).flatten(2).transpose(1, 2)  # (B, N, H)
        return self.out_proj(y)


class TransformerBlock(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, hidden: int, grid: int, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = GDFN(dim=dim, hidden=hidden, grid=grid)

    def forward(self, x: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), fused=fused)
        return x + self.ffn(self.norm2(x))


class Stage(nn.Module):
    def __init__(
        self, *, dim: int, depth: int, num_heads: int, hidden: int, grid: int, qkv_bias: bool, eps: float
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim=dim, num_heads=num_heads, hidden=hidden, grid=grid, qkv_bias=qkv_bias, eps=eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, fused=fused)
        return self.norm(x)


class DenseIsoViT(nn.Module):
    """Tile in (B, C, T, T), T = config.tile_size, values in [0, 1]; out (B, C, sT, sT), s = config.scale.

    Output = bilinear upscale of the input + the network's residual. The output is not clamped:
    callers clamp once after blending tiles.
    """

    def __init__(self, config: DenseIsoViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        grid = c.grid_size
        self.patch_embed = nn.Conv2d(c.in_channels, c.embed_dims[0], c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, c.embed_dims[0]))
        self.stages = nn.ModuleList(
            Stage(
                dim=dim,
                depth=depth,
                num_heads=heads,
                hidden=round(c.gdfn_expansion * dim),
                grid=grid,
                qkv_bias=c.qkv_bias,
                eps=c.layer_norm_eps,
            )
            for dim, depth, heads in zip(c.embed_dims, c.depths, c.num_heads)
        )
        self.transitions = nn.ModuleList(nn.Linear(a, b) for a, b in zip(c.embed_dims, c.embed_dims[1:]))
        self.fusion = nn.Conv2d(c.dense_channels, c.fusion_channels, 3, padding=1)
        upsample: list[nn.Module] = []
        width = c.fusion_channels
        for out in c.upsample_channels:
            upsample += [nn.Conv2d(width, 4 * out, 3, padding=1), nn.PixelShuffle(2), nn.GELU()]
            width = out
        self.upsample = nn.Sequential(*upsample)
        self.to_rgb = nn.Conv2d(width, c.in_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Start as the bilinear skip alone: training then learns a correction from a sane baseline.
        nn.init.zeros_(self.to_rgb.weight)
        nn.init.zeros_(self.to_rgb.bias)

    def forward(self, lr: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
        c = self.config
        _, _, H, W = lr.shape
        if (H, W) != (c.tile_size, c.tile_size):
            raise ValueError(
                f"Dense-Iso-ViT takes {c.tile_size}x{c.tile_size} tiles, got {H}x{W}; tile the image first"
            )
        residual = self.head(self.body(lr, fused=fused))  # (B, C, sT, sT)
        skip = F.interpolate(lr, scale_factor=c.scale, mode="bilinear", align_corners=False)
        return skip + residual.to(skip.dtype)

    def body(self, lr: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
        """The transformer: patch embedding, the stages, their outputs concatenated on the token
        grid, (B, dense_channels, g, g). Apart from `head` so that each can be timed alone."""
        g, B = self.config.grid_size, lr.shape[0]
        x = self.patch_embed(lr).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C0), N = g*g
        features = []
        for i, stage in enumerate(self.stages):
            if i:
                x = self.transitions[i - 1](x)  # (B, N, C_i)
            x = stage(x, fused=fused)
            features.append(x)
        return torch.cat(features, dim=-1).transpose(1, 2).reshape(B, self.config.dense_channels, g, g)

    def head(self, dense: torch.Tensor) -> torch.Tensor:
        """The convolutional head: fusion, the x2 sub-pixel stages, to RGB: the residual (B, C, sT, sT)."""
        return self.to_rgb(self.upsample(self.fusion(dense)))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def precision(device: torch.device, dtype: str) -> Iterator[None]:
    """Autocast to `dtype` ("float32", "bfloat16" or "float16") on `device`; float32 means none."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {dtype!r}; choose one of {sorted(AUTOCAST_DTYPES)}")
    amp = AUTOCAST_DTYPES[dtype]
    if amp is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=amp):
        yield
