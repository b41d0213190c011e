"""Tests for model.metrics against scikit-image and Pillow reference implementations."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.color
import skimage.data
import skimage.metrics
import torch
import torch.nn.functional as F
from PIL import Image

from model.metrics import (
    bicubic_downscale,
    bicubic_downscale_array,
    modcrop,
    psnr,
    rgb_to_y,
    ssim,
)
from pipeline.quality import bicubic_upscale

CROP = 4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()  # 512x512x3 uint8


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return skimage.data.coffee()  # 400x600x3 uint8, non-square catches H/W mix-ups


def _noisy(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = np.round(rng.normal(0.0, sigma, img.shape))
    return np.clip(img.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _crop(img: np.ndarray, c: int = CROP) -> np.ndarray:
    return img[c:-c, c:-c]


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    kwargs = {"channel_axis": -1} if a.ndim == 3 else {}
    return skimage.metrics.structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        **kwargs,
    )


def _sk_y(img_u8: np.ndarray) -> np.ndarray:
    return skimage.color.rgb2ycbcr(img_u8)[..., 0]


# ---------------------------------------------------------------- Y conversion


def test_rgb_to_y_matches_skimage(astronaut: np.ndarray) -> None:
    # skimage scales uint8 to [0, 1] and applies the same 65.481/128.553/24.966
    # matrix, so its Y is already on the 16..235 scale: no unit conversion needed.
    expected = skimage.color.rgb2ycbcr(astronaut)[..., 0]
    y = rgb_to_y(astronaut)
    assert y.dtype == np.float64 and y.shape == astronaut.shape[:2]
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)


def test_rgb_to_y_range_and_float_input() -> None:
    black_white = np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(black_white), [[16.0, 235.0]], atol=1e-12)
    np.testing.assert_array_equal(rgb_to_y(black_white / 255.0), rgb_to_y(black_white))


def test_rgb_to_y_grayscale_is_passed_through() -> None:
    gray = np.random.default_rng(0).integers(0, 256, (6, 5), dtype=np.uint8)
    out = rgb_to_y(gray)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, gray)
    np.testing.assert_array_equal(rgb_to_y(gray[..., None]), gray[..., None])


# ---------------------------------------------------------------------- PSNR


def _reference_pair(noisy: np.ndarray, clean: np.ndarray, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """The cropped pair as skimage should see it; on Y, skimage's own Y, so that the reference does
    not depend on rgb_to_y."""
    if y_channel:
        return _sk_y(_crop(noisy)), _sk_y(_crop(clean))
    return _crop(noisy).astype(np.float64), _crop(clean).astype(np.float64)


@pytest.mark.parametrize("y_channel", [False, True])
def test_psnr_matches_skimage(astronaut: np.ndarray, y_channel: bool) -> None:
    noisy = _noisy(astronaut, 8.0, seed=1)
    a, b = _reference_pair(noisy, astronaut, y_channel)
    expected = skimage.metrics.peak_signal_noise_ratio(b, a, data_range=255)
    got = psnr(noisy, astronaut, crop_border=CROP, y_channel=y_channel)
    assert abs(got - expected) <= 1e-9


def test_psnr_grayscale_matches_skimage(coffee: np.ndarray) -> None:
    gray = coffee[..., 1]
    noisy = _noisy(gray, 5.0, seed=2)
    expected = skimage.metrics.peak_signal_noise_ratio(
        _crop(gray).astype(np.float64), _crop(noisy).astype(np.float64), data_range=255
    )
    assert abs(psnr(noisy, gray) - expected) <= 1e-9
    # Y conversion is a no-op on grayscale.
    assert psnr(noisy, gray, y_channel=True) == psnr(noisy, gray)


def test_psnr_known_mse() -> None:
    ref = np.zeros((16, 16, 3), dtype=np.uint8)
    img = np.ones_like(ref)
    # MSE = 1 -> 20*log10(255) = 48.1308... dB, whatever the crop.
    assert psnr(img, ref) == 20.0 * math.log10(255.0)
    assert psnr(img, ref, crop_border=0) == pytest.approx(48.1308036, abs=1e-7)


def test_identical_images() -> None:
    img = np.random.default_rng(3).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    assert psnr(img, img) == float("inf")
    assert psnr(img, img.copy(), y_channel=True) == float("inf")
    assert ssim(img, img) == 1.0
    assert ssim(img, img.copy(), y_channel=True) == 1.0


# ---------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("y_channel", [False, True])
def test_ssim_matches_skimage(coffee: np.ndarray, y_channel: bool) -> None:
    noisy = _noisy(coffee, 12.0, seed=4)
    a, b = _reference_pair(noisy, coffee, y_channel)
    expected = _sk_ssim(a, b)
    got = ssim(noisy, coffee, crop_border=CROP, y_channel=y_channel)
    # skimage filters with reflect padding, then discards a 5 px border, so what it
    # averages uses interior pixels only: the same 'valid' region as ours. Measured
    # agreement is ~1e-14 (summation-order noise), far inside the 1e-4 budget.
    assert abs(got - expected) <= 1e-10


def test_ssim_grayscale_matches_skimage(astronaut: np.ndarray) -> None:
    gray = astronaut[:96, :128, 0]
    noisy = _noisy(gray, 10.0, seed=5)
    expected = _sk_ssim(_crop(noisy).astype(np.float64), _crop(gray).astype(np.float64))
    assert abs(ssim(noisy, gray) - expected) <= 1e-10


def test_ssim_below_one_for_different_images(astronaut: np.ndarray) -> None:
    noisy = _noisy(astronaut[:64, :64], 20.0, seed=6)
    assert 0.0 < ssim(noisy, astronaut[:64, :64]) < 0.95


# ----------------------------------------------------------- float quantisation


def test_float_input_is_rounded_to_uint8() -> None:
    rng = np.random.default_rng(7)
    img_u8 = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    ref_u8 = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    # Offsets strictly inside (-0.5, 0.5) of a level round back to that level;
    # include values a hair from the 0.5/255 boundaries.
    offs = rng.choice([-0.499, -0.25, 0.0, 0.25, 0.499], size=img_u8.shape)
    img_f = np.clip((img_u8 + offs) / 255.0, 0.0, 1.0)
    ref_f = ref_u8.astype(np.float32) / 255.0
    for y in (False, True):
        assert psnr(img_f, ref_f, y_channel=y) == psnr(img_u8, ref_u8, y_channel=y)
        assert ssim(img_f, ref_u8, y_channel=y) == ssim(img_u8, ref_u8, y_channel=y)


def test_float_rounding_boundary() -> None:
    ref = np.zeros((12, 12), dtype=np.uint8)
    below = np.full((12, 12), 0.499 / 255)  # rounds to 0
    above = np.full((12, 12), 0.501 / 255)  # rounds to 1
    out_of_range = np.full((12, 12), 1.5)  # clipped to 255
    assert psnr(below, ref, crop_border=0) == float("inf")
    assert psnr(above, ref, crop_border=0) == 20.0 * math.log10(255.0)
    assert psnr(out_of_range, np.full((12, 12), 255, np.uint8), crop_border=0) == float("inf")


# -------------------------------------------------------------------- errors


def test_shape_mismatch_raises() -> None:
    a = np.zeros((16, 16, 3), np.uint8)
    b = np.zeros((16, 16), np.uint8)
    with pytest.raises(ValueError, match=r"\(16, 16, 3\) vs ref \(16, 16\)"):
        psnr(a, b)
    with pytest.raises(ValueError, match=r"\(16, 16, 3\) vs ref \(16, 16\)"):
        ssim(a, b)


def test_bad_crop_raises() -> None:
    a = np.zeros((8, 20, 3), np.uint8)
    with pytest.raises(ValueError, match=r"crop_border=4 leaves nothing of a 8x20"):
        psnr(a, a)
    with pytest.raises(ValueError, match=r"non-negative"):
        psnr(a, a, crop_border=-1)
    # 20x20 minus 2*5 leaves 10x10: too small for the 11x11 SSIM window.
    b = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match=r"at least 11x11 .* got 10x10"):
        ssim(b, b, crop_border=5)
    assert ssim(b, b, crop_border=4) == 1.0  # 12x12 is enough


def test_bad_dtype_and_values_raise() -> None:
    with pytest.raises(TypeError, match="uint16"):
        psnr(np.zeros((16, 16), np.uint16), np.zeros((16, 16), np.uint16))
    with pytest.raises(TypeError, match="int32"):
        rgb_to_y(np.zeros((4, 4, 3), np.int32))
    with pytest.raises(ValueError, match="NaN"):
        psnr(np.full((16, 16), np.nan), np.zeros((16, 16)))
    with pytest.raises(ValueError, match="HxWx3"):
        rgb_to_y(np.zeros((4, 4, 2), np.uint8))


# ------------------------------------------------------------ the degradation


def _keys(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = (a + 2) * x**3 - (a + 3) * x**2 + 1
    far = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _pillow_weights(n_in: int, scale: int) -> np.ndarray:
    """Pillow's resample weights (libImaging/Resample.c) in float64."""
    n_out = n_in // scale
    w = np.zeros((n_out, n_in))
    support = 2.0 * scale  # Keys' support of 2, widened by the scale factor
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = _keys((np.arange(lo, hi) - centre + 0.5) / scale)
        w[i, lo:hi] = taps / taps.sum()  # renormalise: border taps are dropped
    return w


def _pillow_reference(img: np.ndarray, scale: int, quantise_between_passes: bool) -> np.ndarray:
    h, w = img.shape[:2]
    tmp = np.einsum("ow,hwc->hoc", _pillow_weights(w, scale), img.astype(np.float64))
    if quantise_between_passes:  # Pillow stores the horizontal pass as uint8
        tmp = np.clip(np.round(tmp), 0, 255)
    return np.einsum("oh,hwc->owc", _pillow_weights(h, scale), tmp)


def test_downscale_close_to_pillow(astronaut: np.ndarray) -> None:
    h, w = astronaut.shape[:2]
    pil = np.asarray(Image.fromarray(astronaut).resize((w // 4, h // 4), Image.BICUBIC))
    ours = bicubic_downscale_array(astronaut)
    assert ours.shape == pil.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int64) - pil)
    # Measured: max 4, mean 0.0987 (coffee: max 3, mean 0.105). The gap is Pillow
    # storing its horizontal pass as uint8: clipping overshoot there gives the max,
    # rounding gives the mean (see test_downscale_is_pillow_filter_in_float).
    assert diff.max() <= 4
    assert diff.mean() <= 0.11

    x = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float() / 255
    plain = F.interpolate(x, size=(h // 4, w // 4), mode="bicubic", antialias=False)
    plain = np.round(plain.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255)
    # Measured: non-antialiased bicubic is max 108, mean 5.44 levels from Pillow.
    assert np.abs(plain - pil).mean() > 10 * diff.mean()


def test_downscale_is_pillow_filter_in_float(astronaut: np.ndarray) -> None:
    img = astronaut[:256, 128:, :]  # 256x384: non-square, keeps the test quick
    h, w = img.shape[:2]
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    ours = bicubic_downscale(x).permute(1, 2, 0).numpy().astype(np.float64)
    exact = np.clip(_pillow_reference(img, 4, quantise_between_passes=False) / 255, 0, 1)
    # Pillow's algorithm in float64 vs ours in float32; measured ~2e-7.
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-6)

    # The same reference with Pillow's uint8 intermediate reproduces Pillow itself
    # (to its fixed-point rounding: measured max 1, mean 2e-4 levels).
    pil = np.asarray(Image.fromarray(img).resize((w // 4, h // 4), Image.BICUBIC))
    quant = np.clip(np.round(_pillow_reference(img, 4, quantise_between_passes=True)), 0, 255)
    assert np.abs(quant - pil).max() <= 1
    assert np.abs(quant - pil).mean() <= 1e-3


def test_downscale_shapes_range_and_constant() -> None:
    x = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(8))
    y = bicubic_downscale(x)
    assert y.shape == (2, 3, 8, 6) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    torch.testing.assert_close(bicubic_downscale(x[0]), y[0])  # unbatched (C, H, W)
    assert bicubic_downscale(x, scale=2).shape == (2, 3, 16, 12)

    const = torch.full((3, 16, 20), 0.37, dtype=torch.float64)
    out = bicubic_downscale(const)
    assert out.shape == (3, 4, 5)
    assert float((out - 0.37).abs().max()) <= 1e-6


def test_downscale_overshoot_is_clamped() -> None:
    # A hard edge makes the cubic lobes overshoot; the output must stay in [0, 1].
    x = torch.zeros(1, 1, 16, 16)
    x[..., :, 8:] = 1.0
    x[..., 6:10, 6:10] = 0.0
    y = bicubic_downscale(x)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_downscale_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="modcrop"):
        bicubic_downscale(torch.zeros(3, 30, 32))
    with pytest.raises(ValueError, match="modcrop"):
        bicubic_downscale_array(np.zeros((32, 30, 3), np.uint8))
    with pytest.raises(TypeError, match="floating"):
        bicubic_downscale(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        bicubic_downscale(torch.zeros(32, 32))
    with pytest.raises(TypeError, match="float32"):
        bicubic_downscale_array(np.zeros((32, 32), np.float32))


def test_downscale_array_dtypes(coffee: np.ndarray) -> None:
    gray = coffee[:64, :96, 0]
    out8 = bicubic_downscale_array(gray)
    assert out8.shape == (16, 24) and out8.dtype == np.uint8

    # 65535 = 257 * 255, so a uint16 copy has the same [0, 1] values; results
    # differ only by the final rounding to each dtype's levels.
    out16 = bicubic_downscale_array(coffee[:64, :96].astype(np.uint16) * 257)
    assert out16.shape == (16, 24, 3) and out16.dtype == np.uint16
    out8_rgb = bicubic_downscale_array(coffee[:64, :96])
    assert np.abs(out16 / 65535.0 - out8_rgb / 255.0).max() <= 0.5 / 255 + 1e-6


def test_array_functions_equal_the_tensor_filter(astronaut: np.ndarray) -> None:
    # The pipeline's checks resize with Pillow in float (no torch in its CPU workers); training
    # degrades with torch. They must be one filter: measured identical after rounding, both ways.
    img = astronaut[:256, 128:, :]
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    torch_down = np.round(bicubic_downscale(x).permute(1, 2, 0).numpy() * 255)
    assert np.array_equal(bicubic_downscale_array(img), torch_down)

    lr = bicubic_downscale_array(img)
    lr_t = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
    up = F.interpolate(lr_t, scale_factor=4, mode="bicubic", antialias=True, align_corners=False)
    torch_up = np.round(up[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255)
    diff = np.abs(bicubic_upscale(lr).astype(np.int64) - torch_up)
    # Measured: identical here; on the whole 512x512 astronaut 4 of 786,432 values are 1 level
    # apart (float sums of a tie rounding either way).
    assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size * 1e-4


def loaded(modules: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of `prefixes` that importing `modules` loads, in a fresh process."""
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return ast.literal_eval(out.stdout.strip())


def test_quality_checks_do_without_torch() -> None:
    # Ray workers that decode, check and encode import these modules; torch would cost each ~2 s of
    # CPU and ~180 MB at start-up, beside the model actors on a small machine.
    assert loaded("pipeline.stages, pipeline.sink", ("torch",)) == []


def test_the_assembler_and_its_tasks_load_neither_ray_data_nor_torch() -> None:
    # The run's Assembler starts while the model actors load: importing Ray Data cost its process
    # ~0.35 CPU-s of ~0.85 there (RESULTS.md), and torch would cost ~2 CPU-s.
    assert loaded("pipeline.assembly", ("ray.data", "torch")) == []


def test_modcrop() -> None:
    img = np.zeros((103, 66, 3), np.uint8)
    assert modcrop(img).shape == (100, 64, 3)
    assert modcrop(img[..., 0], scale=3).shape == (102, 66)
    assert modcrop(np.zeros((8, 12)), 4).shape == (8, 12)
    with pytest.raises(ValueError, match="smaller than scale=4"):
        modcrop(np.zeros((3, 40)))
