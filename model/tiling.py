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

import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

DEFAULT_HALO = 4  # input pixels of overlap per tile side: (64 / 56)^2 = 1.31x the compute of none
DEFAULT_BATCH_SIZE = 8  # tiles per forward pass: 4-8 is best on CPU (RESULTS.md)
# Tiles with less detail than this (model.inference.tile_detail, 8-bit levels) skip the network by
# default: it cost at most 0.0015 dB PSNR-Y on any held-out photo (RESULTS.md, content-adaptive skipping).
DEFAULT_SKIP_DETAIL = 0.5


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


@dataclass(frozen=True)
class Band:
    """A horizontal slice of an image's work: tile rows of its own, and the output rows they reach.

    Bands share no tile: each runs its own tile rows, once. Where two bands' tiles overlap (the
    blend of the last tile row of one with the first of the next: `halo` * scale rows or so, rounded
    out to whole input rows), neither band has the whole of an output row, so each hands over its
    part of those seam rows, weighted and normalised by the whole image's weights; the two parts
    add up to the rows as the whole image's plan blends them (join_seam). Every other output row of
    `span` is the band's own (`out_rows`), finished.
    """

    tile_rows: tuple[int, int]  # [r0, r1) of plan.ys
    out_rows: tuple[int, int]  # output rows the band finishes, in output-image coordinates
    in_rows: tuple[int, int]  # input rows the tiles read, in input-image coordinates (padding excluded)
    span: tuple[int, int]  # output rows its tiles reach: [span[0], out_rows[0]) and [out_rows[1], span[1]) are seams


def whole_image(plan: TilePlan, scale: int) -> Band:
    rows = (0, scale * plan.height)
    return Band((0, len(plan.ys)), rows, (0, plan.height), rows)


def _reach(plan: TilePlan, weights: list[np.ndarray], scale: int, r: int) -> tuple[int, int]:
    """Output rows [first, last + 1) to which tile row `r` gives a non-zero weight."""
    nonzero = np.flatnonzero(weights[r])
    return scale * plan.ys[r] + int(nonzero[0]), scale * plan.ys[r] + int(nonzero[-1]) + 1


def _bands(plan: TilePlan, scale: int, reach: list[tuple[int, int]], starts: list[int]) -> list[Band] | None:
    """The bands that start at tile rows `starts` (the first 0), seams rounded out to whole input
    rows; None where a seam would reach past a neighbour (a halo so large that a thin band's tiles
    all overlap its neighbours'). `reach`: each tile row's output rows (_reach)."""
    down = lambda row: row - row % scale
    up = lambda row: -(-row // scale) * scale
    bands = []
    for r0, r1 in itertools.pairwise([*starts, len(plan.ys)]):
        span = (down(reach[r0][0]), up(reach[r1 - 1][1]))
        # Rows a tile of another band reaches are not the band's own. Tiles move down the image,
        # so those of the bands above reach no further than the last of them, and below likewise.
        own = (up(reach[r0 - 1][1]) if r0 else span[0], down(reach[r1][0]) if r1 < len(plan.ys) else span[1])
        if not span[0] <= own[0] <= own[1] <= span[1]:
            return None
        bands.append(Band((r0, r1), own, (plan.ys[r0], plan.ys[r1 - 1] + plan.tile), span))
    if any(above.span[1] > below.span[0] for above, below in zip(bands, bands[2:])):
        return None  # a seam shared by three bands
    return bands


def split_rows(plan: TilePlan, scale: int, *, max_tiles: int, pieces: int = 1, min_rows: int = 2) -> list[Band]:
    """Split an image into bands of whole tile rows: as few as keep each to `max_tiles` tiles, but at
    least `pieces`, each of at least `min_rows` tile rows (more where a large halo needs it). Their
    row counts differ by one at most, the taller first: actors share a run's last bands, each taking
    the next as it comes free, so a band more than asked for, or a taller one last, leaves one actor
    working while the others wait (RESULTS.md). An image of fewer than 2 * min_rows tile rows, or one
    that fits in one band, is one band. No tile runs twice."""
    n_rows, n_cols = len(plan.ys), len(plan.xs)
    rows_per_band = max(1, max_tiles // n_cols)  # the most that keep a band to max_tiles
    count = min(max(pieces, -(-n_rows // rows_per_band)), n_rows // min_rows)
    if count < 2:
        return [whole_image(plan, scale)]
    # Only images taller than a tile get here, so there is no vertical padding to account for.
    weights = axis_weights(list(plan.ys), plan.tile, scale)
    reach = [_reach(plan, weights, scale, r) for r in range(n_rows)]
    while count >= 2:
        rows, taller = divmod(n_rows, count)
        bands = _bands(plan, scale, reach, [i * rows + min(i, taller) for i in range(count)])
        if bands is not None:
            return bands
        count = min(count - 1, n_rows // (n_rows // count + 1))  # the thinnest band a row taller
    return [whole_image(plan, scale)]


def extract_tiles(plane: np.ndarray, plan: TilePlan, band: Band | None = None) -> np.ndarray:
    """(H, W, C) float32 plane -> (N, C, T, T) float32 tiles of `band` (default: the whole image),
    row-major. For a band, `plane` holds only the band's input rows (band.in_rows)."""
    band = band or whole_image(plan, 1)
    top, bottom, left, right = plan.pad
    if any(plan.pad):
        plane = np.pad(plane, ((top, bottom), (left, right), (0, 0)), mode="symmetric")
    t, origin = plan.tile, band.in_rows[0]
    r0, r1 = band.tile_rows
    tiles = np.stack([plane[y - origin : y - origin + t, x : x + t] for y in plan.ys[r0:r1] for x in plan.xs])
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))  # (N, C, T, T)


def _kinds(weights: list[np.ndarray]) -> list[int]:
    """For each of an axis's weight vectors, the index of the first one equal to it."""
    first: dict[bytes, int] = {}
    return [first.setdefault(w.tobytes(), i) for i, w in enumerate(weights)]


# Output rows that Canvas._normalised divides at a time: a 2,048-wide image's weights for them, 256 KB,
# stay in the cache while every plane is divided (the whole band's at once: ~25 % slower; 16 rows: ~10 %).
NORMALISE_ROWS = 32


@dataclass
class Canvas:
    """Accumulates the weighted upscaled tiles of one plane (or one band of it); `result()`
    normalises, crops padding and returns the band's own output rows, `seams()` its parts of the
    seam rows."""

    plan: TilePlan
    scale: int
    channels: int
    band: Band | None = None
    filled: int = 0

    def __post_init__(self) -> None:
        s, plan = self.scale, self.plan
        self.band = self.band or whole_image(plan, s)
        r0, r1 = self.band.tile_rows
        self._origin = s * plan.ys[r0]  # padded-output row of the canvas's first row
        height = s * (plan.ys[r1 - 1] + plan.tile) - self._origin
        # Planes, (C, rows, columns): a tile's (C, sT, sT) output adds in row by row, with no
        # transpose, through one scratch buffer (a 512x512 photo's blending took half the time in
        # HWC; on a GPU node this CPU work, not the network, is what a model actor spends its time on).
        self.total = np.zeros((self.channels, height, s * plan.padded_shape[1]), np.float32)
        self._weighted = np.empty((self.channels, s * plan.tile, s * plan.tile), np.float32)
        self._wy = axis_weights(list(plan.ys), plan.tile, s)
        self._wx = axis_weights(list(plan.xs), plan.tile, s)
        # A tile's (sT, sT) float32 weights, made once for each pair of distinct weight vectors: most tiles
        # share their rows' and columns' ramps (made again for each tile, they took ~22 % of `add`'s time).
        self._kind_y, self._kind_x = _kinds(self._wy), _kinds(self._wx)
        self._pairs: dict[tuple[int, int], np.ndarray] = {}
        # Normalised by the whole image's weights, over every tile row (a band's neighbours' too): a
        # band's own rows come out as the whole image's, and its seam rows as its part of them.
        # Every tile spans all tile columns, so the weight sum is separable: sum_y x sum_x.
        self._sum_y = np.zeros(height)
        for iy, y0 in enumerate(plan.ys):
            y = s * y0 - self._origin
            weights = self._wy[iy][max(-y, 0) : max(height - y, 0)]
            self._sum_y[max(y, 0) : max(y, 0) + len(weights)] += weights
        self._sum_x = np.zeros(s * plan.padded_shape[1])
        for ix, x in enumerate(plan.xs):
            self._sum_x[s * x : s * (x + plan.tile)] += self._wx[ix]

    def __len__(self) -> int:
        r0, r1 = self.band.tile_rows
        return (r1 - r0) * len(self.plan.xs)

    def add(self, index: int, tile_out: np.ndarray) -> None:
        """Blend in the (C, sT, sT) output of the band's tile `index` (row-major within the band)."""
        ix_count = len(self.plan.xs)
        iy, ix = divmod(index, ix_count)
        iy += self.band.tile_rows[0]
        y = self.scale * self.plan.ys[iy] - self._origin
        x = self.scale * self.plan.xs[ix]
        side = self.plan.tile * self.scale
        self.total[:, y : y + side, x : x + side] += np.multiply(tile_out, self._weights(iy, ix), out=self._weighted)
        self.filled += 1

    def _weights(self, iy: int, ix: int) -> np.ndarray:
        """Tile (iy, ix)'s (sT, sT) float32 blend weights."""
        key = self._kind_y[iy], self._kind_x[ix]
        if key not in self._pairs:
            self._pairs[key] = (self._wy[key[0]][:, None] * self._wx[key[1]][None, :]).astype(np.float32)
        return self._pairs[key]

    @property
    def done(self) -> bool:
        return self.filled == len(self)

    def _normalised(self, a: int, b: int) -> np.ndarray:
        """Output rows [a, b) (output-image coordinates), normalised, padding cropped; float32."""
        s, (top, _, left, _) = self.scale, self.plan.pad
        first = a + s * top - self._origin
        cols = slice(s * left, s * (left + self.plan.width))
        planes = self.total[:, first : first + b - a, cols]
        out = np.empty((*planes.shape[1:], planes.shape[0]), np.float32)  # (rows, columns, C)
        # NORMALISE_ROWS rows at a time, so that their weights stay in the cache for every plane; one
        # plane at a time: ~3x faster than one transposed divide.
        for r0 in range(0, b - a, NORMALISE_ROWS):
            r1 = min(r0 + NORMALISE_ROWS, b - a)
            weight = (self._sum_y[first + r0 : first + r1, None] * self._sum_x[None, cols]).astype(np.float32)
            for c, plane in enumerate(planes):
                np.divide(plane[r0:r1], weight, out=out[r0:r1, :, c])
        return out

    def result(self) -> np.ndarray:
        """The band's own output rows, (rows, s*W, C) float32 clipped to [0, 1]."""
        out = self._normalised(*self.band.out_rows)
        return np.clip(out, 0.0, 1.0, out=out)

    def seams(self) -> tuple[np.ndarray, np.ndarray]:
        """The band's parts of the seam rows above and below its own, (rows, s*W, C) float32, not
        clipped: a seam's two parts add up to its rows (join_seam)."""
        (a, b), (first, last) = self.band.out_rows, self.band.span
        return self._normalised(first, a), self._normalised(b, last)


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
    upscaling cannot pull their (often black) colour into visible edges. Visible pixels unchanged.
    Any dtype; `alpha` is HxW."""
    hidden = alpha <= 0
    if not hidden.any() or hidden.all():
        return rgb
    from scipy import ndimage  # here: importing it costs every process that imports this ~0.35 s

    _, (iy, ix) = ndimage.distance_transform_edt(hidden, return_indices=True)
    return rgb[iy, ix]


def prepare(image: np.ndarray) -> np.ndarray:
    """Check an image's layout and dtype and fill the colour under fully transparent pixels.
    Raises ValueError (layout, size) or TypeError (dtype) saying what was expected."""
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(f"expected an HxW, HxWx1, x2 (grey+alpha), x3 or x4 (RGBA) image, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be at least 1x1, got {image.shape[0]}x{image.shape[1]}")
    _max_value(image.dtype)
    if image.ndim == 3 and image.shape[2] in (2, 4):
        colour = fill_transparent(image[..., :-1], image[..., -1])
        image = np.concatenate([colour, image[..., -1:]], axis=2)
    return image


def _planes(pixels: np.ndarray) -> list[np.ndarray]:
    """A prepared image (or rows of one) as 3-channel float32 planes in [0, 1]: colour, then alpha."""
    x = pixels.astype(np.float32) / _max_value(pixels.dtype)
    if x.ndim == 2:
        x = x[..., None]
    channels = x.shape[2]
    colour, alpha = (x[..., :-1], x[..., -1:]) if channels in (2, 4) else (x, None)
    planes = [np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour]
    return planes + ([np.repeat(alpha, 3, axis=2)] if alpha is not None else [])


def _merge(planes: list[np.ndarray], like: np.ndarray) -> np.ndarray:
    """Inverse of _planes for the upscaled planes: back to `like`'s layout and dtype (rounded)."""
    channels = 1 if like.ndim == 2 else like.shape[2]
    colour = planes[0]
    if channels in (1, 2):
        colour = colour.mean(axis=2, keepdims=True)  # grey in, grey out
    out = np.concatenate([colour, planes[1].mean(axis=2, keepdims=True)], axis=2) if channels in (2, 4) else colour
    out *= _max_value(like.dtype)
    out = np.rint(out, out=out).astype(like.dtype)
    return out[..., 0] if like.ndim == 2 else out


# ---------------------------------------------------------------------------------------------
# Entry points


@dataclass(frozen=True)
class Piece:
    """A unit of tiler work: a whole image, or one band of a large one."""

    pixels: np.ndarray  # rows band.in_rows of a prepared image
    plan: TilePlan  # the whole image's plan
    band: Band


def split_image(
    image: np.ndarray, *, tile: int, scale: int, halo: int, max_tiles: int | None = None, pieces: int = 1
) -> list[Piece]:
    """Prepare an image and cut it into pieces of about `max_tiles` tiles (None: no limit), and into
    at least `pieces` where it is tall enough (split_rows). Upscaling the pieces and stacking their
    rows (stack_pieces) gives the image's whole upscale."""
    image = prepare(image)
    plan = plan_tiles(image.shape[0], image.shape[1], tile=tile, halo=halo)
    tiles = len(plan.ys) * len(plan.xs)
    bands = split_rows(plan, scale, max_tiles=max_tiles or tiles, pieces=pieces)
    return [Piece(image[b.in_rows[0] : b.in_rows[1]], plan, b) for b in bands]


@dataclass(frozen=True)
class Upscaled:
    """What upscaling a piece gives: its own output rows, finished (the input's layout and dtype),
    and its parts of the seams above and below them (float32, the colour plane's channels then the
    alpha plane's; no rows where there is no seam), which join_seam adds to the neighbours' parts."""

    rows: np.ndarray
    seam_above: np.ndarray
    seam_below: np.ndarray


def join_seam(above: np.ndarray, below: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A seam's rows from the parts of the band above it (its seam_below) and the band below (its
    seam_above), in the layout and dtype of `like` (rows of either band). Equal to the whole
    image's rows but for rounding: a value can land on the next level."""
    both = np.add(above, below)
    np.clip(both, 0.0, 1.0, out=both)
    return _merge([both[..., i : i + 3] for i in range(0, both.shape[2], 3)], like)


def stack_pieces(pieces: Iterable[Upscaled]) -> Iterator[np.ndarray]:
    """The output rows of one image's pieces, top to bottom: each piece's own rows, and after each
    piece but the last the seam it shares with the next. Stacked, the whole image's upscale."""
    above = None
    for piece in pieces:
        if above is not None:
            yield join_seam(above, piece.seam_above, piece.rows)
        yield piece.rows
        above = piece.seam_below


@dataclass
class _Job:
    like: np.ndarray  # layout and dtype of the result
    canvases: list[Canvas]

    @property
    def done(self) -> bool:
        return all(c.done for c in self.canvases)

    def result(self) -> Upscaled:
        above, below = zip(*(c.seams() for c in self.canvases))
        rows = _merge([c.result() for c in self.canvases], self.like)
        return Upscaled(rows, np.concatenate(above, axis=2), np.concatenate(below, axis=2))


def upscale_pieces(
    pieces: Iterable[Piece], model: TileModel, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[Upscaled]:
    """Upscale pieces by model.scale, yielding each one's output (Upscaled) in input order as soon
    as its last tile is blended. Tiles of consecutive pieces share batches of `batch_size`; a piece
    is taken from `pieces` only when its tiles are needed to fill a batch. If taking the next piece
    raises, every piece before it is delivered first, then the error."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    jobs: deque[_Job] = deque()
    pending: deque[tuple[Canvas, int, np.ndarray]] = deque()  # (canvas, tile index, tile)

    def run_batch() -> None:
        batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
        outputs = model(np.stack([t for _, _, t in batch]))
        for (canvas, index, _), out in zip(batch, outputs):
            canvas.add(index, out)

    def finished() -> Iterator[Upscaled]:
        while jobs and jobs[0].done:
            yield jobs.popleft().result()

    source = iter(pieces)
    while True:
        try:
            piece = next(source)
        except StopIteration:
            break
        except (ValueError, TypeError):
            while pending:
                run_batch()
                yield from finished()
            raise
        planes = _planes(piece.pixels)
        job = _Job(piece.pixels, [Canvas(piece.plan, model.scale, 3, piece.band) for _ in planes])
        jobs.append(job)
        for canvas, plane in zip(job.canvases, planes):
            pending.extend((canvas, i, t) for i, t in enumerate(extract_tiles(plane, piece.plan, piece.band)))
        while len(pending) >= batch_size:
            run_batch()
            yield from finished()
    while pending:
        run_batch()
        yield from finished()
    yield from finished()


def upscale_arrays(
    images: Iterable[np.ndarray], model: TileModel, *, halo: int = DEFAULT_HALO, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[np.ndarray]:
    """Upscale images (HxW, HxWx1, x2, x3 or x4; uint8 or uint16) by model.scale, yielding each in
    input order as soon as its last tile is blended; tiles of consecutive images share batches.

    Output: same layout and dtype, exactly (scale*H)x(scale*W). Raises ValueError/TypeError for a
    layout, dtype or halo it cannot handle, before running the model on that image and after
    yielding every image before it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pieces = (split_image(image, tile=model.tile_size, scale=model.scale, halo=halo)[0] for image in images)
    return (out.rows for out in upscale_pieces(pieces, model, batch_size=batch_size))


def upscale_array(
    image: np.ndarray, model: TileModel, *, halo: int = DEFAULT_HALO, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """Upscale one image; see `upscale_arrays` for what is accepted and guaranteed."""
    return next(upscale_arrays([image], model, halo=halo, batch_size=batch_size))
