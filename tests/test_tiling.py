"""Tests for model.tiling: tile maths, exact output sizes, seamless blending, batching, alpha, 16-bit, errors.

Two stand-in networks make the tiler's promises checkable against an untiled reference:
- `Bilinear`: F.interpolate x4 (the real network with its residual forced to zero). Blending copies
  of one smooth function must give back that function, so tiled == whole-image bilinear.
- `RandomConv`: two random 3x3 convs (receptive radius 2 LR px, zero padding) plus a bilinear skip.
  Its tile outputs depend on context, so naive pasting shows seams; being fully convolutional it can
  also run on the whole image, which is the untiled reference.
The real (tiny, randomly initialised) network is used for the batching test.

Figures are printed (run with -s to see them).
"""

from __future__ import annotations

import inspect
import itertools
import math
import re

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from model import tiling
from model.config import variant
from model.inference import TileUpscaler
from model.network import DenseIsoViT
from model.tiling import (
    axis_starts,
    axis_weights,
    fill_transparent,
    plan_tiles,
    ramp,
    split_image,
    stack_pieces,
    upscale_array,
    upscale_arrays,
    upscale_pieces,
)

TILE = 64
SCALE = 4
HALO = 8  # the halo used wherever a test does not vary it


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The test machine has 2 shared cores; torch's thread pool under contention is ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Stand-in TileModels


def bilinear_x4(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=SCALE, mode="bilinear", align_corners=False)


def whole_bilinear(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) float -> (4H, 4W[, C]) float64: the untiled bilinear reference, same units."""
    x = np.asarray(image, np.float64)
    planar = x[None, None] if x.ndim == 2 else x.transpose(2, 0, 1)[None]
    y = bilinear_x4(torch.from_numpy(np.ascontiguousarray(planar)))[0].numpy()
    return y[0] if x.ndim == 2 else y.transpose(1, 2, 0)


class Bilinear:
    """The network with its residual forced to zero."""

    tile_size = TILE
    scale = SCALE

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        assert tiles.dtype == np.float32 and tiles.shape[1:] == (3, TILE, TILE), tiles.shape
        return bilinear_x4(torch.from_numpy(tiles)).numpy()


class Counting:
    """Wraps a TileModel; records the size of every forward batch."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.tile_size = inner.tile_size
        self.scale = inner.scale
        self.batches: list[int] = []

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.batches.append(len(tiles))
        return self.inner(tiles)


class RandomConv:
    """Fully convolutional and context dependent: bilinear(x) + bilinear(conv(tanh(conv(x)))), 3x3
    convs with zero padding at LR resolution (receptive radius 2 LR px), seeded random weights."""

    tile_size = TILE
    scale = SCALE

    def __init__(self, seed: int = 0, hidden: int = 8, gain: float = 0.25) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(hidden, 3, 3, 3, generator=g) * 0.5
        self.b1 = torch.randn(hidden, generator=g) * 0.2
        self.w2 = torch.randn(3, hidden, 3, 3, generator=g) * (gain / (3 * math.sqrt(hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.conv2d(x, self.w1, self.b1, padding=1))
        residual = F.conv2d(h, self.w2, padding=1)
        return bilinear_x4(x) + bilinear_x4(residual)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.forward(torch.from_numpy(tiles)).numpy()

    def whole(self, plane: np.ndarray) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1] -> (4H, 4W, 3), clipped: the untiled reference."""
        x = torch.from_numpy(np.ascontiguousarray(plane.transpose(2, 0, 1)))[None]
        return np.clip(self.forward(x)[0].numpy().transpose(1, 2, 0), 0.0, 1.0)


def naive_paste(plane: np.ndarray, model) -> np.ndarray:
    """What the tiler must beat: halo-0 tiles at multiples of 64, zero padded at the far edge, outputs
    pasted side by side without blending. (H, W, 3) float32 -> (4H, 4W, 3) clipped."""
    h, w, _ = plane.shape
    ph, pw = -h % TILE, -w % TILE
    padded = np.pad(plane, ((0, ph), (0, pw), (0, 0)))
    boxes = [(y, x) for y in range(0, h + ph, TILE) for x in range(0, w + pw, TILE)]
    tiles = np.stack([padded[y : y + TILE, x : x + TILE].transpose(2, 0, 1) for y, x in boxes])
    outs = model(np.ascontiguousarray(tiles))
    canvas = np.zeros((SCALE * (h + ph), SCALE * (w + pw), 3), np.float32)
    side = SCALE * TILE
    for (y, x), out in zip(boxes, outs):
        canvas[SCALE * y : SCALE * y + side, SCALE * x : SCALE * x + side] = out.transpose(1, 2, 0)
    return np.clip(canvas[: SCALE * h, : SCALE * w], 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# 1. Tile maths (properties)


def coverage_1d(starts: list[int], tile: int, halo: int, length: int) -> np.ndarray:
    """Sum over tiles of the 1D blend weights, in output pixels along an axis of `length` px."""
    total = np.zeros(SCALE * length)
    for start, w in zip(starts, axis_weights(starts, tile, SCALE)):
        total[SCALE * start : SCALE * start + SCALE * tile] += w
    return total


MIN_WEIGHT_SUM_SEEN: list[float] = []

sides = st.integers(min_value=1, max_value=400)
halos = st.integers(min_value=0, max_value=31)


@settings(max_examples=300, deadline=None)
@given(length=sides, halo=halos)
def test_axis_starts_cover_the_axis_with_tiles_inside(length: int, halo: int) -> None:
    extent = max(length, TILE)
    starts = axis_starts(extent, TILE, halo)
    assert starts[0] == 0
    assert starts[-1] + TILE == extent, "last tile must end exactly at the edge"
    assert all(0 <= s and s + TILE <= extent for s in starts), "every tile inside the axis"
    assert all(a < b for a, b in itertools.pairwise(starts)), f"starts not strictly increasing: {starts}"
    covered = np.zeros(extent, bool)
    for s in starts:
        covered[s : s + TILE] = True
    assert covered.all(), f"pixels {np.flatnonzero(~covered)[:5]} not covered"
    # Context: neighbours overlap by at least 2*halo (exactly 2*halo except at a moved-back last tile).
    overlaps = [a + TILE - b for a, b in itertools.pairwise(starts)]
    assert all(o >= 2 * halo for o in overlaps), overlaps
    assert all(o == 2 * halo for o in overlaps[:-1]), overlaps
    # The unpadded length (as axis_starts is documented for) gives the same tiles.
    assert axis_starts(length, TILE, halo) == starts


@settings(max_examples=200, deadline=None)
@given(height=sides, width=sides, halo=halos)
def test_plan_tiles_pads_only_short_axes_to_exactly_one_tile(height: int, width: int, halo: int) -> None:
    plan = plan_tiles(height, width, tile=TILE, halo=halo)
    top, bottom, left, right = plan.pad
    assert min(plan.pad) >= 0
    assert plan.padded_shape == (max(height, TILE), max(width, TILE))
    if height >= TILE:
        assert (top, bottom) == (0, 0)
    else:
        assert top + bottom + height == TILE and abs(top - bottom) <= 1  # centred
    if width >= TILE:
        assert (left, right) == (0, 0)
    else:
        assert left + right + width == TILE and abs(left - right) <= 1
    assert list(plan.ys) == axis_starts(max(height, TILE), TILE, halo)
    assert list(plan.xs) == axis_starts(max(width, TILE), TILE, halo)
    assert len(plan) == len(plan.ys) * len(plan.xs) == len(plan.boxes)


@settings(max_examples=300, deadline=None)
@given(length=sides, halo=halos)
def test_blend_weights_in_unit_interval_and_sum_positive(length: int, halo: int) -> None:
    extent = max(length, TILE)
    starts = axis_starts(extent, TILE, halo)
    for w in axis_weights(starts, TILE, SCALE):
        assert w.shape == (SCALE * TILE,)
        assert w.min() >= 0.0 and w.max() <= 1.0
    total = coverage_1d(starts, TILE, halo, extent)
    MIN_WEIGHT_SUM_SEEN.append(float(total.min()))
    # The 2D weight is the outer product of the 1D ones, so its sum is the product of 1D sums.
    assert total.min() > 0.0, f"length {length}, halo {halo}: zero weight sum at {np.flatnonzero(total <= 0)[:5]}"


def test_blend_weight_sum_exhaustive_minimum() -> None:
    """Every length 1..400 and halo 0..31: the smallest 1D weight sum (2D min = product of two)."""
    worst = (np.inf, None)
    for halo in range(32):
        for length in range(1, 401):
            extent = max(length, TILE)
            total = coverage_1d(axis_starts(extent, TILE, halo), TILE, halo, extent)
            if total.min() < worst[0]:
                worst = (float(total.min()), (length, halo))
    seen = min(MIN_WEIGHT_SUM_SEEN) if MIN_WEIGHT_SUM_SEEN else float("nan")
    print(
        f"\nmin 1D blend weight sum: exhaustive {worst[0]:.6f} at (length, halo) = {worst[1]}; hypothesis saw {seen:.6f}"
    )
    assert worst[0] >= 0.5  # far from 0: no pixel is dominated by a tile's context-less edge


@pytest.mark.parametrize("halo", range(32))
def test_regular_overlap_weights_sum_to_one(halo: int) -> None:
    length = 2 * TILE - 2 * halo  # exactly two tiles overlapping by 2*halo
    starts = axis_starts(length, TILE, halo)
    assert starts == [0, TILE - 2 * halo]
    total = coverage_1d(starts, TILE, halo, length)
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    w0, w1 = axis_weights(starts, TILE, SCALE)
    if halo:  # context-less quarter of each overlap gets no weight; the far side is full weight
        assert w0[0] == 1.0 and w1[-1] == 1.0
        assert w0[-1] == 0.0 and w1[0] == 0.0


@pytest.mark.parametrize(("height", "width", "halo"), [(300, 451, 4), (40, 200, 0), (200, 64, 8), (130, 257, 1)])
def test_blending_is_the_weighted_mean_of_the_tiles_written_out_to_the_bit(height: int, width: int, halo: int) -> None:
    """Canvas shares each pair of weight vectors' weights among tiles and normalises a few rows at a
    time, for speed (RESULTS.md): the result is still, bit for bit, each tile output times its weights,
    summed in tile order, divided by the summed weights, in float32."""
    plan = tiling.plan_tiles(height, width, tile=TILE, halo=halo)
    outputs = np.random.default_rng(height).random((len(plan), 3, SCALE * TILE, SCALE * TILE), dtype=np.float32)
    wy, wx = axis_weights(list(plan.ys), TILE, SCALE), axis_weights(list(plan.xs), TILE, SCALE)
    padded_h, padded_w = (SCALE * side for side in plan.padded_shape)
    total = np.zeros((3, padded_h, padded_w), np.float32)
    sum_y, sum_x = np.zeros(padded_h), np.zeros(padded_w)
    side = SCALE * TILE
    for k, (y, x) in enumerate(plan.boxes):
        iy, ix = divmod(k, len(plan.xs))
        total[:, SCALE * y : SCALE * y + side, SCALE * x : SCALE * x + side] += outputs[k] * (
            wy[iy][:, None] * wx[ix][None, :]
        ).astype(np.float32)
    for iy, y in enumerate(plan.ys):
        sum_y[SCALE * y : SCALE * y + side] += wy[iy]
    for ix, x in enumerate(plan.xs):
        sum_x[SCALE * x : SCALE * x + side] += wx[ix]
    top, _, left, _ = plan.pad
    rows, cols = slice(SCALE * top, SCALE * (top + height)), slice(SCALE * left, SCALE * (left + width))
    expected = total[:, rows, cols] / (sum_y[rows, None] * sum_x[None, cols]).astype(np.float32)
    expected = np.clip(expected.transpose(1, 2, 0), 0.0, 1.0)
    assert np.array_equal(tiling.blend_tiles(outputs, plan, SCALE), expected)


def test_ramp_is_complementary() -> None:
    x = np.linspace(-0.5, 1.5, 2001)
    np.testing.assert_allclose(ramp(x) + ramp(1 - x), 1.0, rtol=0, atol=1e-12)
    assert ramp(np.array([-1.0]))[0] == 0.0 and ramp(np.array([2.0]))[0] == 1.0


# ---------------------------------------------------------------------------------------------
# 2. Exact output size, layout and dtype

_rng_sizes = np.random.default_rng(1234)
SIZES = [(1, 1), (1, 100), (100, 1), (63, 65), (64, 64), (65, 65), (17, 300)] + [
    tuple(int(v) for v in _rng_sizes.integers(1, 160, size=2)) for _ in range(3)
]
LAYOUTS = {"grey": (), "grey1": (1,), "LA": (2,), "RGB": (3,), "RGBA": (4,)}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["u8", "u16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_output_is_exactly_4x_same_layout_and_dtype(size, layout, dtype) -> None:
    h, w = size
    top = np.iinfo(dtype).max
    shape = (h, w) + LAYOUTS[layout]
    channels = 1 if len(shape) == 2 else shape[2]
    # Distinct constant per channel (alpha opaque-ish, non-zero): bilinear must return it exactly.
    levels = np.array([0.2, 0.55, 0.9, 0.75])[:channels]
    if channels in (2, 4):
        levels[-1] = 0.75
    values = np.round(levels * top).astype(dtype)
    image = np.broadcast_to(values, (h, w, channels)).reshape(shape).copy()
    out = upscale_array(image, Bilinear(), halo=HALO)
    assert out.shape == (4 * h, 4 * w) + LAYOUTS[layout]
    assert out.dtype == dtype
    expected = np.broadcast_to(values, (4 * h, 4 * w, channels)).reshape(out.shape)
    assert np.abs(out.astype(np.int64) - expected).max() <= 1  # colours/alpha not shifted or swapped


# ---------------------------------------------------------------------------------------------
# 3. Acceptance: blended bilinear tiles == whole-image bilinear

_default_halo = inspect.signature(upscale_array).parameters["halo"].default
IDENTITY_CASES = [
    (size, halo)
    for size in [(1, 1), (17, 300), (63, 65), (200, 333)]
    for halo in ["default", 1, 8, 31]
    # 200x333 at halo 31 is 9384 tiles (step 2), ~20 s of Canvas.add alone: a 96x160 image stands in
    # for it (833 tiles, the same deep multi-tile overlaps in both axes).
]
IDENTITY_CASES = [((96, 160), 31) if c == ((200, 333), 31) else c for c in IDENTITY_CASES]


@pytest.mark.parametrize("size,halo", IDENTITY_CASES, ids=[f"{h}x{w}-halo{halo}" for (h, w), halo in IDENTITY_CASES])
def test_tiled_bilinear_equals_whole_image_bilinear(size, halo) -> None:
    h, w = size
    rng = np.random.default_rng(h * 1000 + w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if halo == "default":
        if _default_halo is inspect.Parameter.empty:
            pytest.skip("upscale_array has no default halo (halo is a required keyword)")
        out = upscale_array(image, Bilinear(), batch_size=64)
    else:
        out = upscale_array(image, Bilinear(), halo=halo, batch_size=64)
    assert out.shape == (4 * h, 4 * w, 3) and out.dtype == np.uint8
    ref = whole_bilinear(image.astype(np.float32) / 255) * 255
    err = np.abs(out - ref)
    worst = float(err.max())
    where = np.unravel_index(err.argmax(), err.shape)
    print(f"\nidentity {h}x{w} halo {halo}: max error {worst:.4f} levels at {where}")
    assert worst <= 0.5 + 1e-3, f"max error {worst:.3f}/255 at {where}"  # rounding only, so well within 1/255


# ---------------------------------------------------------------------------------------------
# 4. Acceptance: no seams with a context-dependent model


def band_mask(shape: tuple[int, int], edges_y, edges_x, width: int = 8) -> np.ndarray:
    """Output pixels within `width` output px of a tile boundary at LR position e (output 4e)."""
    h, w = shape
    rows, cols = np.zeros(h, bool), np.zeros(w, bool)
    for e in edges_y:
        rows[max(SCALE * e - width, 0) : SCALE * e + width] = True
    for e in edges_x:
        cols[max(SCALE * e - width, 0) : SCALE * e + width] = True
    return rows[:, None] | cols[None, :]


def interior_edges(starts, length: int) -> list[int]:
    edges = {s for s in starts} | {s + TILE for s in starts}
    return sorted(e for e in edges if 0 < e < length)


def seam_stats(out01: np.ndarray, ref: np.ndarray, band: np.ndarray) -> tuple[float, float, float]:
    err = np.abs(out01.astype(np.float64) - ref).max(axis=2)
    return float(err[band].mean()), float(err[~band].mean()), float(err[band].max())


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage.data.astronaut()[100:250, 150:320]  # 150x170 RGB uint8, face and suit


def test_blended_tiles_have_no_seams_but_naive_pasting_does(photo: np.ndarray) -> None:
    model = RandomConv()
    h, w, _ = photo.shape
    plane = photo.astype(np.float32) / 255
    ref = model.whole(plane)

    # Blended, through the tiler. Quantised to 8 bits like any output.
    plan = plan_tiles(h, w, tile=TILE, halo=HALO)
    assert plan.pad == (0, 0, 0, 0) and len(plan) > 4
    out = upscale_array(photo, model, halo=HALO) / 255
    band = band_mask((4 * h, 4 * w), interior_edges(plan.ys, h), interior_edges(plan.xs, w))
    b_band, b_away, b_max = seam_stats(out, ref, band)

    # Naive: halo-0 tiles at multiples of 64 pasted side by side, quantised the same way.
    naive = np.round(naive_paste(plane, model) * 255) / 255
    grid = range(TILE, max(h, w), TILE)
    nband = band_mask((4 * h, 4 * w), [e for e in grid if e < h], [e for e in grid if e < w])
    n_band, n_away, n_max = seam_stats(naive, ref, nband)

    print(
        f"\nseams (abs error vs untiled, [0,1] units): blended band {b_band:.5f} away {b_away:.5f} max-in-band "
        f"{b_max * 255:.2f}/255; naive band {n_band:.5f} away {n_away:.5f} max-in-band {n_max * 255:.1f}/255 "
        f"(ratio {n_band / n_away:.1f}x)"
    )
    # Blended: the tile boundaries are invisible.
    assert b_band <= b_away + 1e-3, (b_band, b_away)
    assert b_max <= 2 / 255, b_max * 255
    # Stricter, since RandomConv's context radius (2.5 LR px incl. the bilinear) is inside the
    # zero-weight quarter of each overlap (halo/2 = 4 px): blending is exact up to 8-bit rounding.
    # (A ramp starting at the tile edge instead leaks up to 1.6/255 here and passes the bounds above.)
    assert b_max <= 0.5 / 255 + 1e-4, b_max * 255
    # Naive: same criterion fails, clearly; proves RandomConv's tiles depend on context.
    assert not n_band <= n_away + 1e-3
    assert n_band >= 10 * n_away, (n_band, n_away)
    assert n_max > 10 / 255


def test_halo_zero_on_abutting_tiles_shows_seams_halo_8_does_not(photo: np.ndarray) -> None:
    """The library's own halo=0 on a 128x192 image is naive pasting (tiles abut, nothing to blend)."""
    model = RandomConv(seed=1)
    image = photo[:128, :128]
    image = np.concatenate([image, photo[:128, 106:170]], axis=1)  # 128x192
    h, w, _ = image.shape
    ref = model.whole(image.astype(np.float32) / 255)
    band = band_mask((4 * h, 4 * w), [64], [64, 128])
    assert plan_tiles(h, w, tile=TILE, halo=0).xs == (0, 64, 128)
    z_band, z_away, _ = seam_stats(upscale_array(image, model, halo=0) / 255, ref, band)
    b_band, b_away, b_max = seam_stats(upscale_array(image, model, halo=HALO) / 255, ref, band)
    print(f"\n128x192 halo 0: band {z_band:.5f} away {z_away:.5f}; halo 8: band {b_band:.5f} away {b_away:.5f}")
    assert z_band >= 10 * z_away
    assert b_band <= b_away + 1e-3 and b_max <= 0.5 / 255 + 1e-4


# ---------------------------------------------------------------------------------------------
# 5. Packing tiles of many images into shared batches


@pytest.fixture(scope="module")
def tiny_net() -> TileUpscaler:
    torch.manual_seed(0)
    net = DenseIsoViT(variant("tiny"))
    nn.init.normal_(net.to_rgb.weight, std=0.02)  # non-zero residual: not just bilinear
    return TileUpscaler(net, device="cpu", dtype="float32")


def mixed_images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [
        rng.integers(0, 256, (70, 90, 3), dtype=np.uint8),  # 4 tiles, first: finishes after smaller ones
        rng.integers(0, 256, (30, 40), dtype=np.uint8),  # grey, 1 tile
        rng.integers(0, 65536, (1, 1, 2), dtype=np.uint16),  # LA 16-bit: 2 planes
        rng.integers(0, 256, (40, 70, 4), dtype=np.uint8),  # RGBA: 2 planes x 2 tiles
        rng.integers(0, 256, (64, 64, 1), dtype=np.uint8),  # HxWx1, 1 tile
    ]


class PerTileForward:
    """Runs the wrapped network one tile at a time. CPU matmuls are not bitwise batch-size invariant
    (the tiny net differs by ~6e-8 between a batch of 5 and of 1), so exact equality of packed and
    alone needs this; the batches the tiler forms are still recorded by an outer `Counting`."""

    def __init__(self, inner) -> None:
        self.inner, self.tile_size, self.scale = inner, inner.tile_size, inner.scale

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return np.concatenate([self.inner(tiles[i : i + 1]) for i in range(len(tiles))])


def test_shared_batches_give_identical_results_in_input_order(tiny_net: TileUpscaler) -> None:
    images = mixed_images()
    images[3][:10, :10, 3] = 0  # some fully transparent pixels
    counted = Counting(PerTileForward(tiny_net))
    packed = list(upscale_arrays(iter(images), counted, halo=HALO, batch_size=5))
    assert counted.batches == [5, 5, 2]  # 12 tiles of 5 images (RGBA and LA: colour + alpha) shared
    assert len(packed) == len(images)
    for i, (image, out) in enumerate(zip(images, packed)):
        alone = upscale_array(image, PerTileForward(tiny_net), halo=HALO, batch_size=1)
        assert out.shape == alone.shape == (4 * image.shape[0], 4 * image.shape[1]) + image.shape[2:], i
        assert out.dtype == image.dtype
        assert np.array_equal(out, alone), (
            f"image {i}: packed differs from alone by {np.abs(out.astype(int) - alone).max()}"
        )
    # The residual is really non-zero: the network is not just the bilinear skip.
    plain = upscale_array(images[0], Bilinear(), halo=HALO)
    assert np.abs(packed[0].astype(int) - plain).max() >= 2


def test_shared_batches_with_batched_forward_agree_within_rounding(tiny_net: TileUpscaler) -> None:
    """The real batched forward: only float noise of the network itself may differ (<= 1 level, rarely)."""
    images = mixed_images()
    packed = list(upscale_arrays(images, tiny_net, halo=HALO, batch_size=5))
    for i, (image, out) in enumerate(zip(images, packed)):
        alone = upscale_array(image, tiny_net, halo=HALO, batch_size=1)
        diff = np.abs(out.astype(np.int64) - alone)
        assert diff.max() <= 1 and np.mean(diff > 0) < 1e-4, (i, diff.max(), np.mean(diff > 0))


@pytest.mark.parametrize(
    ("shape", "dtype", "halo", "max_tiles"),
    [
        ((300, 130, 3), np.uint8, 4, 6),  # the default halo: 16-row seams
        ((517, 96, 4), np.uint8, 4, 4),  # RGBA: colour and alpha planes, each with its seams
        ((401, 70, 2), np.uint16, 8, 3),  # grey + alpha at 16 bits
        ((260, 70), np.uint8, 28, 2),  # a halo so large that two-row bands would share a seam with three
        ((600, 64, 3), np.uint8, 0, 3),  # no halo: abutting tiles, no seam rows at all
    ],
)
def test_bands_run_each_tile_once_and_stack_as_the_whole_image(shape, dtype, halo: int, max_tiles: int) -> None:
    """Bands share no tile: each band's own rows come out as the whole image's, and each seam, the
    sum of two bands' parts, within one level of it (the sum rounds in another order)."""
    image = np.random.default_rng(11).integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
    net = RandomConv(seed=1)
    whole = upscale_array(image, net, halo=halo)
    pieces = split_image(image, tile=TILE, scale=SCALE, halo=halo, max_tiles=max_tiles)
    counted = Counting(net)
    stacked = np.concatenate(list(stack_pieces(upscale_pieces(pieces, counted))))

    plan = plan_tiles(*shape[:2], tile=TILE, halo=halo)
    planes = 2 if len(shape) == 3 and shape[2] in (2, 4) else 1
    assert len(pieces) >= 3 and sum(counted.batches) == len(plan) * planes  # every tile once
    assert [p.band.tile_rows for p in pieces] == list(
        itertools.pairwise([p.band.tile_rows[0] for p in pieces] + [len(plan.ys)])
    )
    assert stacked.shape == whole.shape and stacked.dtype == whole.dtype
    seams = np.zeros(len(whole), bool)
    for above, below in itertools.pairwise(p.band for p in pieces):
        assert above.span[1] == below.out_rows[0] and above.out_rows[1] == below.span[0]
        seams[below.span[0] : above.span[1]] = True
    diff = np.abs(stacked.astype(np.int64) - whole)
    assert diff[~seams].max() == 0
    assert diff[seams].max(initial=0) <= 1 and np.count_nonzero(diff[seams]) <= 0.01 * diff[seams].size
    assert seams.any() == (halo > 0)


@pytest.mark.parametrize(
    ("height", "pieces", "max_tiles", "rows"),
    [
        (1024, 4, 1024, [5, 5, 5, 4]),  # 19 tile rows: cut by tiles alone, 5 bands (4, 4, 4, 4, 3)
        (2240, 16, 1024, [3] * 8 + [2] * 8),  # 40 tile rows shared by 16 actors: by tiles alone, 20 bands
        (512, 4, 1024, [3, 2, 2, 2]),  # 9 tile rows
        (400, 4, 1024, [3, 2, 2]),  # 7 tile rows: no band under two
        (1024, 1, 100, [5, 5, 5, 4]),  # max_tiles alone: 19 x 19 tiles, at most 100 a band
        (1024, 4, 60, [3] * 5 + [2] * 2),  # max_tiles asks for more bands than pieces
    ],
)
def test_an_image_is_cut_into_as_many_even_bands_as_asked_taller_first(height, pieces, max_tiles, rows) -> None:
    """Actors share the last round's bands, each taking the next as it comes free: one band too many,
    or a taller one last, leaves one actor working while another waits."""
    image = np.zeros((height, 1024, 3), np.uint8)  # 19 tile columns
    bands = [p.band for p in split_image(image, tile=TILE, scale=SCALE, halo=4, max_tiles=max_tiles, pieces=pieces)]
    assert [b.tile_rows[1] - b.tile_rows[0] for b in bands] == rows
    assert all((b.tile_rows[1] - b.tile_rows[0]) * 19 <= max_tiles for b in bands)


def test_generator_input_is_consumed_lazily() -> None:
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(10)]  # 1 tile each
    pulled: list[int] = []

    def source():
        for i, image in enumerate(images):
            pulled.append(i)
            yield image

    outputs = upscale_arrays(source(), Bilinear(), halo=HALO, batch_size=2)
    first = next(outputs)
    assert first.shape == (4 * 20, 120, 3)
    assert len(pulled) <= 2 < len(images), f"first output only after pulling {len(pulled)} images"
    rest = list(outputs)
    assert len(pulled) == len(images)
    assert [o.shape[0] for o in [first] + rest] == [4 * (20 + i) for i in range(10)]  # input order


# ---------------------------------------------------------------------------------------------
# 6. RGBA: no dark fringe from the black under transparent pixels


def red_disk() -> np.ndarray:
    yy, xx = np.mgrid[:40, :40]
    inside = (yy - 19.5) ** 2 + (xx - 19.5) ** 2 <= 12.0**2
    image = np.zeros((40, 40, 4), np.uint8)  # transparent black
    image[inside] = (255, 0, 0, 255)
    return image


def test_rgba_edges_keep_their_colour() -> None:
    image = red_disk()
    out = upscale_array(image, Bilinear(), halo=HALO)
    assert out.shape == (160, 160, 4) and out.dtype == np.uint8
    alpha = out[..., 3].astype(int)
    visible = alpha > 0.05 * 255
    edge = (alpha > 0) & (alpha < 255)
    assert edge.sum() > 100, "alpha must be upscaled smoothly, with intermediate values at the edge"
    assert alpha.max() == 255 and alpha.min() == 0
    # Alpha is the plain upscale of alpha.
    ref_alpha = whole_bilinear(image[..., 3].astype(np.float32))
    assert np.abs(alpha - ref_alpha).max() <= 0.5 + 1e-3
    rgb = out[..., :3].astype(int)
    print(f"\nRGBA fringe (tiler): min R {rgb[visible, 0].min()}, max G/B {rgb[visible, 1:].max()} over alpha > 5%")
    assert rgb[visible, 0].min() >= 250
    assert rgb[visible, 1:].max() <= 5

    # Without filling the transparent colour, the black bleeds in: R follows alpha down to ~half.
    naive_rgb = whole_bilinear(image[..., :3].astype(np.float32))
    naive_alpha = whole_bilinear(image[..., 3].astype(np.float32))
    nvis = naive_alpha > 0.05 * 255
    half = (naive_alpha > 0.4 * 255) & (naive_alpha < 0.6 * 255)
    print(
        f"RGBA fringe (no fill): min R {naive_rgb[nvis, 0].min():.1f}, median R at alpha~50% {np.median(naive_rgb[half, 0]):.1f}"
    )
    assert naive_rgb[nvis, 0].min() < 250  # the same criterion fails without the fix
    assert 0.35 * 255 <= np.median(naive_rgb[half, 0]) <= 0.65 * 255
    # And fill_transparent itself: hidden pixels take the visible colour, visible ones are unchanged.
    filled = fill_transparent(image[..., :3].astype(np.float32) / 255, image[..., 3].astype(np.float32) / 255)
    assert np.array_equal(filled, np.broadcast_to(np.array([1.0, 0.0, 0.0], np.float32), filled.shape))


# ---------------------------------------------------------------------------------------------
# 7. 16-bit


def gradient16(h: int, w: int, channels: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w] / np.array([h - 1, w - 1])[:, None, None]
    colour = [0.7 * xx + 0.3 * yy, 1 - (0.6 * yy + 0.4 * xx), xx * yy][: 3 if channels >= 3 else 1]
    alpha = [0.1 + 0.9 * (0.5 + 0.5 * (xx - yy))] if channels in (2, 4) else []  # never fully transparent
    return np.round(np.stack(colour + alpha, axis=2) * 65535).astype(np.uint16)


@pytest.mark.parametrize("layout", ["grey", "LA", "RGB", "RGBA"])
def test_uint16_keeps_full_precision(layout: str) -> None:
    channels = {"grey": 1, "LA": 2, "RGB": 3, "RGBA": 4}[layout]
    image = gradient16(50, 90, channels)
    if layout == "grey":
        image = image[..., 0]
    assert image.min() == 0 and image.max() == 65535
    out = upscale_array(image, Bilinear(), halo=HALO)
    assert out.dtype == np.uint16
    assert out.shape == (200, 360) + image.shape[2:]
    ref = whole_bilinear(image.astype(np.float32) / 65535) * 65535
    err = np.abs(out - ref).max()
    print(f"\nuint16 {layout}: max error {err:.3f} / 65535")
    assert err <= 1.0  # rounding (0.5) plus float32 blending noise, far below one 8-bit step (257)
    assert out.max() > 255 and len(np.unique(out)) > 1024, "16-bit detail kept, not squeezed to 8 bits"
    assert np.mean(out % 257 == 0) < 0.05


# ---------------------------------------------------------------------------------------------
# 8. Errors, raised before the model runs


@pytest.mark.parametrize("halo", [32, 40, -1])
def test_bad_halo_raises_value_error_naming_the_halo(halo: int) -> None:
    model = Counting(Bilinear())
    with pytest.raises(ValueError, match=rf"halo.*{halo}"):
        upscale_array(np.zeros((10, 10, 3), np.uint8), model, halo=halo)
    assert model.batches == []


@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (5, 0, 3)])
def test_empty_image_raises_value_error(shape) -> None:
    model = Counting(Bilinear())
    with pytest.raises(ValueError, match="at least 1x1"):
        upscale_array(np.zeros(shape, np.uint8), model, halo=HALO)
    assert model.batches == []


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int32])
def test_unsupported_dtype_raises_type_error_naming_it(dtype) -> None:
    model = Counting(Bilinear())
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        upscale_array(np.zeros((8, 8, 3), dtype), model, halo=HALO)
    assert model.batches == []


@pytest.mark.parametrize("shape", [(4, 4, 5), (4, 4, 3, 1), (4,)])
def test_bad_layout_raises_value_error_naming_the_shape(shape) -> None:
    model = Counting(Bilinear())
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        upscale_array(np.zeros(shape, np.uint8), model, halo=HALO)
    assert model.batches == []


@pytest.mark.parametrize("batch_size", [0, -3])
def test_bad_batch_size_raises_value_error(batch_size: int) -> None:
    model = Counting(Bilinear())
    with pytest.raises(ValueError, match="batch_size"):
        upscale_array(np.zeros((8, 8, 3), np.uint8), model, halo=HALO, batch_size=batch_size)
    assert model.batches == []


@pytest.mark.parametrize("batch_size", [1, 8])
def test_bad_image_after_good_ones_fails_only_when_reached(batch_size: int) -> None:
    """Images before a bad one are still delivered, even while their tiles wait for a full batch."""
    good = np.zeros((8, 8, 3), np.uint8)
    outputs = upscale_arrays([good, good, np.zeros((8, 8), np.float64)], Bilinear(), halo=HALO, batch_size=batch_size)
    assert next(outputs).shape == (32, 32, 3)
    assert next(outputs).shape == (32, 32, 3)
    with pytest.raises(TypeError, match="float64"):
        next(outputs)


def test_big_endian_uint16_is_accepted() -> None:
    image = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(">u2")
    out = upscale_array(image, Bilinear(), halo=HALO)
    assert out.shape == (80, 120) and out.dtype.kind == "u" and out.dtype.itemsize == 2
    ref = whole_bilinear(image.astype(np.float64) / 65535) * 65535
    assert np.abs(out.astype(np.float64) - ref).max() <= 1.0


def test_module_exposes_the_documented_api() -> None:
    for name in (
        "axis_starts",
        "ramp",
        "axis_weights",
        "plan_tiles",
        "extract_tiles",
        "Canvas",
        "blend_tiles",
        "fill_transparent",
        "upscale_arrays",
        "upscale_array",
        "split_image",
        "upscale_pieces",
        "stack_pieces",
        "join_seam",
    ):
        assert callable(getattr(tiling, name)), name
