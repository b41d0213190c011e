"""Seamless tiling: any HxW image (H, W >= 1) becomes exactly (scale*H)x(scale*W) through a network
that only takes fixed TxT tiles.

How it works, and why:
- Tiles step by T - 2*halo, so neighbours overlap by 2*halo. The last tile of a row or column is
  moved back inside the image rather than padded past its edge, so every tile sees real pixels.
  Only an image smaller than a tile along an axis is padded along it (symmetric, centred), since a
  tile must be full.
- Overlaps are blended with raised-cosine weights that are 0 over the quarter of each overlap
  nearest a tile's inner edge (where the tile lacks context), rise as sin^2 over the middle half,
  and are 1 beyond. In a regular overlap the two tiles' weights sum to exactly 1; wherever tiles
  meet irregularly (a moved-back edge tile) the blend divides by the weight sum. Image borders are
  never ramped: there is no neighbour to hand over to.
- Planes to upscale are always 3 channels: grey is replicated, alpha is upscaled as its own grey
  plane, and the colour under fully transparent pixels is first filled from the nearest visible
  pixel so that nothing dark bleeds into edges (the "dark fringe").
- Tiles of many images (and of an image's colour and alpha planes) share forward batches.

Everything here is numpy; the network is any `TileModel`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy import ndimage


DEFAULT_HALO = 4  # input pixels of overlap per tile side: (64 / 56)^2 = 1.31x the compute of none


class TileModel(Protocol):
    """What the tiler needs of a network: it maps (N, 3, T, T) float32 in [0, 1] to
    (N, 3, s*T, s*T) float32, with T = tile_size and s = scale."""

    tile_size: int
    scale: int

    def __call__(self, tiles: np.ndarray) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# Pure tile maths


def check_halo(halo: int, tile: int) -> None:
    """Raise ValueError unless 0 <= halo < tile / 2 (a larger halo leaves tiles no step)."""
    if not 0 <= halo < tile / 2:
        raise ValueError(f"halo must be between 0 and {(tile - 1) // 2} pixels for {tile}-pixel tiles, got {halo}")


def axis_starts(length: int, tile: int, halo: int) -> list[int]:
    """Tile origins along one axis of `max(length, tile)` pixels: step tile - 2*halo, the last one
    moved back so it ends exactly at the edge. Raises ValueError for a halo that leaves no step."""
    if length < 1:
        raise ValueError(f"image side must be at least 1 pixel, got {length}")
    check_halo(halo, tile)
    if length <= tile:
        return [0]
    step = tile - 2 * halo
    count = math.ceil((length - tile) / step) + 1
    return [min(i * step, length - tile) for i in range(count)]


def ramp(x: np.ndarray) -> np.ndarray:
    """0 below 0, sin^2 rise on [0, 1], 1 above; ramp(x) + ramp(1 - x) == 1."""
    return np.sin(np.pi / 2 * np.clip(x, 0.0, 1.0)) ** 2


def axis_weights(starts: list[int], tile: int, scale: int) -> list[np.ndarray]:
    """Blend weights, one (scale*tile,) float64 vector per tile, along one axis in output pixels."""
    centres = (np.arange(scale * tile) + 0.5) / scale  # output pixel centres in input-pixel units
    weights = []
    for i, start in enumerate(starts):
        w = np.ones(scale * tile)
        if i > 0:
            overlap = starts[i - 1] + tile - start
            if overlap > 0:
                w *= ramp((centres - overlap / 4) / (overlap / 2))
        if i + 1 < len(starts):
            overlap = start + tile - starts[i + 1]
            if overlap > 0:
                w *= ramp((tile - centres - overlap / 4) / (overlap / 2))
        weights.append(w)
    return weights


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one HxW image go. `pad` is (top, bottom, left, right), non-zero only
    along an axis shorter than a tile; tile origins are in padded coordinates."""

    height: int
    width: int
    tile: int
    halo: int
    pad: tuple[int, int, int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def boxes(self) -> list[tuple[int, int]]:
        """(y, x) origin of every tile, row-major; tile k covers [y, y+T) x [x, x+T)."""
        return [(y, x) for y in self.ys for x in self.xs]

    @property
    def padded_shape(self) -> tuple[int, int]:
        top, bottom, left, right = self.pad
        return self.height + top + bottom, self.width + left + right

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)


def plan_tiles(height: int, width: int, *, tile: int, halo: int) -> TilePlan:
    """Plan the tiles of a height x width image. Raises ValueError for sizes < 1 or a bad halo."""
    pad_y, pad_x = max(tile - height, 0), max(tile - width, 0)
    pad = (pad_y // 2, pad_y - pad_y // 2, pad_x // 2, pad_x - pad_x // 2)
    return TilePlan(
        height=height,
        width=width,
        tile=tile,
        halo=halo,
        pad=pad,
        ys=tuple(axis_starts(height + pad_y, tile, halo)),
        xs=tuple(axis_starts(width + pad_x, tile, halo)),
    )


def extract_tiles(plane: np.ndarray, plan: TilePlan) -> np.ndarray:
    """(H, W, C) float32 plane -> (N, C, T, T) float32 tiles, in `plan.boxes` order."""
    top, bottom, left, right = plan.pad
    if any(plan.pad):
        plane = np.pad(plane, ((top, bottom), (left, right), (0, 0)), mode="symmetric")
    t = plan.tile
    tiles = np.stack([plane[y : y + t, x : x + t] for y, x in plan.boxes])  # (N, T, T, C)
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))


@dataclass
class Canvas:
    """Accumulates weighted upscaled tiles of one plane; `result()` divides and crops the pad."""

    plan: TilePlan
    scale: int
    channels: int
    total: np.ndarray = field(init=False)
    weight: np.ndarray = field(init=False)
    filled: int = 0

    def __post_init__(self) -> None:
        h, w = self.plan.padded_shape
        s = self.scale
        self.total = np.zeros((s * h, s * w, self.channels), np.float32)
        self.weight = np.zeros((s * h, s * w, 1), np.float32)
        self._wy = axis_weights(list(self.plan.ys), self.plan.tile, s)
        self._wx = axis_weights(list(self.plan.xs), self.plan.tile, s)

    def add(self, index: int, tile_out: np.ndarray) -> None:
        """Blend in the (C, sT, sT) output of tile `index` (in plan.boxes order)."""
        n_x = len(self.plan.xs)
        iy, ix = divmod(index, n_x)
        y, x = self.plan.ys[iy] * self.scale, self.plan.xs[ix] * self.scale
        side = self.plan.tile * self.scale
        w = (self._wy[iy][:, None] * self._wx[ix][None, :]).astype(np.float32)[..., None]  # (sT, sT, 1)
        self.total[y : y + side, x : x + side] += tile_out.transpose(1, 2, 0) * w
        self.weight[y : y + side, x : x + side] += w
        self.filled += 1

    @property
    def done(self) -> bool:
        return self.filled == len(self.plan)

    def result(self) -> np.ndarray:
        """(s*H, s*W, C) float32, clipped to [0, 1]."""
        top, _, left, _ = self.plan.pad
        s = self.scale
        out = self.total / self.weight
        out = out[s * top : s * (top + self.plan.height), s * left : s * (left + self.plan.width)]
        return np.clip(out, 0.0, 1.0)


def blend_tiles(outputs: np.ndarray, plan: TilePlan, scale: int) -> np.ndarray:
    """(N, C, sT, sT) tile outputs in plan.boxes order -> (s*H, s*W, C) float32 in [0, 1]."""
    canvas = Canvas(plan, scale, outputs.shape[1])
    for index, tile_out in enumerate(outputs):
        canvas.add(index, tile_out)
    return canvas.result()


# ---------------------------------------------------------------------------------------------
# Images: layouts, dtypes, alpha


def _max_value(dtype: np.dtype) -> float:
    if dtype.kind == "u" and dtype.itemsize in (1, 2):  # either byte order: 16-bit TIFFs can be big-endian
        return float(2 ** (8 * dtype.itemsize) - 1)
    raise TypeError(f"images must be uint8 or uint16, got {dtype}")


def fill_transparent(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colour of fully transparent pixels replaced by that of the nearest visible pixel, so that
    upscaling cannot pull their (often black) colour into visible edges. Visible pixels unchanged."""
    hidden = alpha <= 0
    if not hidden.any() or hidden.all():
        return rgb
    _, (iy, ix) = ndimage.distance_transform_edt(hidden, return_indices=True)
    return rgb[iy, ix]


def _planes(image: np.ndarray) -> list[np.ndarray]:
    """Split an HxW[xC] image (C = 1, 2, 3, 4) into 3-channel float32 planes: colour, then alpha."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, x2 (grey+alpha), x3 or x4 (RGBA) image, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be at least 1x1, got {image.shape[0]}x{image.shape[1]}")
    x = image.astype(np.float32) / _max_value(image.dtype)
    channels = image.shape[2]
    colour, alpha = (x[..., :-1], x[..., -1]) if channels in (2, 4) else (x, None)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    if alpha is None:
        return [colour]
    return [fill_transparent(colour, alpha), np.repeat(alpha[..., None], 3, axis=2)]


def _merge(planes: list[np.ndarray], like: np.ndarray) -> np.ndarray:
    """Inverse of _planes for the upscaled planes: back to `like`'s layout and dtype (rounded)."""
    channels = 1 if like.ndim == 2 else like.shape[2]
    colour = planes[0]
    if channels in (1, 2):
        colour = colour.mean(axis=2, keepdims=True)  # grey in, grey out
    parts = [colour] + ([planes[1].mean(axis=2, keepdims=True)] if channels in (2, 4) else [])
    out = np.concatenate(parts, axis=2)
    out = np.round(out * _max_value(like.dtype)).astype(like.dtype)
    return out[..., 0] if like.ndim == 2 else out


# ---------------------------------------------------------------------------------------------
# Entry points


@dataclass
class _Job:
    image: np.ndarray
    canvases: list[Canvas]

    @property
    def done(self) -> bool:
        return all(c.done for c in self.canvases)


def upscale_arrays(
    images: Iterable[np.ndarray], model: TileModel, *, halo: int = DEFAULT_HALO, batch_size: int = 8
) -> Iterator[np.ndarray]:
    """Upscale images (HxW, HxWx1, x2, x3 or x4; uint8 or uint16) by model.scale, yielding each in
    input order as soon as its last tile is blended. Tiles of consecutive images share batches of
    `batch_size`; an image is taken from `images` only when its tiles are needed to fill a batch.

    Output: same layout and dtype, exactly (scale*H)x(scale*W). Raises ValueError/TypeError for a
    layout, dtype or halo it cannot handle, before running the model on that image and after
    yielding every image before it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tile, scale = model.tile_size, model.scale
    jobs: deque[_Job] = deque()
    pending: deque[tuple[Canvas, int, np.ndarray]] = deque()  # (canvas, tile index, tile)

    def run_batch(n: int) -> None:
        batch = [pending.popleft() for _ in range(min(n, len(pending)))]
        outputs = model(np.stack([t for _, _, t in batch]))
        for (canvas, index, _), out in zip(batch, outputs):
            canvas.add(index, out)

    def finished() -> Iterator[np.ndarray]:
        while jobs and jobs[0].done:
            job = jobs.popleft()
            yield _merge([c.result() for c in job.canvases], job.image)

    for image in images:
        try:
            planes = _planes(image)
            plan = plan_tiles(planes[0].shape[0], planes[0].shape[1], tile=tile, halo=halo)
        except (ValueError, TypeError):
            while pending:  # deliver the images before the bad one, then report it
                run_batch(batch_size)
                yield from finished()
            raise
        job = _Job(image, [Canvas(plan, scale, 3) for _ in planes])
        jobs.append(job)
        for canvas, plane in zip(job.canvases, planes):
            pending.extend((canvas, i, t) for i, t in enumerate(extract_tiles(plane, plan)))
        while len(pending) >= batch_size:
            run_batch(batch_size)
            yield from finished()
    while pending:
        run_batch(batch_size)
        yield from finished()
    yield from finished()


def upscale_array(image: np.ndarray, model: TileModel, *, halo: int = DEFAULT_HALO, batch_size: int = 8) -> np.ndarray:
    """Upscale one image; see `upscale_arrays` for what is accepted and guaranteed."""
    return next(upscale_arrays([image], model, halo=halo, batch_size=batch_size))
