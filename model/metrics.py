"""Image-quality metrics (PSNR, SSIM) and the bicubic x4 degradation.

Conventions follow BasicSR (basicsr/metrics/psnr_ssim.py, basicsr/utils/color_util.py)
so that figures are comparable with published super-resolution results:

* Images are numpy arrays HxW or HxWxC (C = 1 or 3, RGB order), dtype uint8, or
  float in [0, 1]. Float input is first quantised the way BasicSR's ``tensor2img``
  does: ``clip(round(x * 255), 0, 255)``. All arithmetic is then float64 on [0, 255].
* ``crop_border`` pixels (default 4, the scale factor) are removed from every side.
* ``y_channel=True`` evaluates on BT.601 luma, Y = 16 + (65.481 R + 128.553 G +
  24.966 B) / 255, in [16, 235] and not rounded.
* SSIM: 11x11 Gaussian window, sigma 1.5, only positions where the whole window fits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = [
    "bicubic_downscale",
    "bicubic_downscale_array",
    "bicubic_resize_array",
    "modcrop",
    "psnr",
    "rgb_to_y",
    "ssim",
]

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0

_SSIM_RADIUS = 5
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2


def _check_scale(scale: int) -> None:
    # bool is an int subclass; scale=True is almost certainly a bug at the call site.
    if not isinstance(scale, int) or isinstance(scale, bool):
        raise TypeError(f"scale must be an int, got {type(scale).__name__}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")


def _check_multiples(h: int, w: int, scale: int) -> None:
    if h < scale or w < scale or h % scale or w % scale:
        raise ValueError(
            f"height and width must be positive multiples of scale={scale}, got {h}x{w}; "
            "crop the image first with modcrop()"
        )


def _to_255(img: np.ndarray, name: str = "img") -> np.ndarray:
    """Return ``img`` as float64 on the uint8 grid [0, 255] (float input is quantised)."""
    img = np.asarray(img)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"{name} must be HxW, HxWx1 or HxWx3, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float64)
    if np.issubdtype(img.dtype, np.floating):
        # NaN would silently become an arbitrary uint8 value and corrupt the metric.
        if not np.all(np.isfinite(img)):
            raise ValueError(f"{name} contains NaN or infinite values")
        # Quantise like BasicSR's tensor2img so float and uint8 inputs score identically.
        return np.clip(np.round(img.astype(np.float64) * 255.0), 0.0, 255.0)
    raise TypeError(f"{name} must be uint8 or float in [0, 1], got dtype {img.dtype}")


def _luma(img255: np.ndarray) -> np.ndarray:
    if img255.ndim == 3 and img255.shape[2] == 3:
        return 16.0 + img255 @ _Y_WEIGHTS
    return img255


def _prepare(img: np.ndarray, ref: np.ndarray, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate, quantise, crop and optionally Y-convert a pair; returns HxWxC float64."""
    img, ref = np.asarray(img), np.asarray(ref)
    if img.shape != ref.shape:
        raise ValueError(f"image shapes differ: img {img.shape} vs ref {ref.shape}")
    if not isinstance(crop_border, int) or isinstance(crop_border, bool) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative int, got {crop_border!r}")
    a, b = _to_255(img, "img"), _to_255(ref, "ref")
    h, w = a.shape[:2]
    if 2 * crop_border >= min(h, w):
        raise ValueError(
            f"crop_border={crop_border} leaves nothing of a {h}x{w} image (needs 2*crop_border < {min(h, w)})"
        )
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        a, b = _luma(a), _luma(b)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return a, b


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB image, as BasicSR's ``rgb2ycbcr(y_only=True)`` on [0, 255].

    Returns float64 HxW with Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, in
    [16, 235], not rounded. Float input is quantised to the uint8 grid first.
    Grayscale input (HxW or HxWx1) is taken to be luma already: it is returned as
    float64 on [0, 255] with its shape kept and no 16..235 mapping applied.
    Raises TypeError for dtypes other than uint8/float, ValueError for other shapes.
    """
    return _luma(_to_255(img))


def psnr(img: np.ndarray, ref: np.ndarray, *, crop_border: int = 4, y_channel: bool = False) -> float:
    """PSNR in dB on the [0, 255] scale, after cropping ``crop_border`` px per side.

    MSE is taken over every remaining value (all channels together). Returns
    ``inf`` for identical images. Raises ValueError on a shape mismatch, a crop that
    leaves nothing, or non-finite float input; TypeError on unsupported dtypes.
    """
    a, b = _prepare(img, ref, crop_border, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(20.0 * np.log10(255.0 / np.sqrt(mse)))


def _gaussian_window() -> np.ndarray:
    x = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2.0 * _SSIM_SIGMA**2))
    return k / k.sum()


def _filter_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of HxWxC ``x`` with the 1-D kernel ``k``."""
    n = k.size
    x = np.lib.stride_tricks.sliding_window_view(x, n, axis=0) @ k
    return np.lib.stride_tricks.sliding_window_view(x, n, axis=1) @ k


def ssim(img: np.ndarray, ref: np.ndarray, *, crop_border: int = 4, y_channel: bool = False) -> float:
    """Mean SSIM (BasicSR's ``_ssim``), averaged over channels.

    11x11 normalised Gaussian window (sigma 1.5), C1 = (0.01*255)^2,
    C2 = (0.03*255)^2, evaluated only where the whole window fits inside the cropped
    image (BasicSR's filter2D followed by a [5:-5, 5:-5] crop). Identical images give
    1.0. Raises ValueError on a shape mismatch, a bad crop, or a cropped image
    smaller than 11x11; TypeError on unsupported dtypes.
    """
    a, b = _prepare(img, ref, crop_border, y_channel)
    size = 2 * _SSIM_RADIUS + 1
    if min(a.shape[:2]) < size:
        raise ValueError(
            f"SSIM needs at least {size}x{size} pixels after cropping, "
            f"got {a.shape[0]}x{a.shape[1]} (crop_border={crop_border})"
        )
    k = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = _filter_valid(a * a, k) - mu_aa
    var_b = _filter_valid(b * b, k) - mu_bb
    cov = _filter_valid(a * b, k) - mu_ab
    ssim_map = ((2 * mu_ab + _SSIM_C1) * (2 * cov + _SSIM_C2)) / (
        (mu_aa + mu_bb + _SSIM_C1) * (var_a + var_b + _SSIM_C2)
    )
    # Per-channel means first, then their mean: BasicSR's order of averaging.
    return float(np.mean(ssim_map.mean(axis=(0, 1))))


def bicubic_downscale(img: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """The degradation: antialiased bicubic downscaling by an integer factor.

    Input is a floating tensor (B, C, H, W) or (C, H, W) in [0, 1], with H and W
    positive multiples of ``scale``. Output has the same rank, size (H/scale,
    W/scale), dtype float32, on the input's device, clamped to [0, 1].

    The filter is ``F.interpolate(mode="bicubic", antialias=True,
    align_corners=False)``: Keys' cubic convolution with a = -0.5, its support
    widened by the scale factor (so it low-passes before decimating). That is the
    same filter as Pillow's ``Image.resize(..., Image.BICUBIC)`` and close to
    MATLAB's ``imresize``; at the borders the weights falling outside the image are
    dropped and the rest renormalised (Pillow's way), not MATLAB's symmetric
    padding. Note ``antialias=False`` would be a different filter (a = -0.75, no
    widening) and aliases.

    Raises TypeError for non-floating tensors, ValueError for bad rank or sizes.
    """
    # Imported here: the pipeline's quality checks use the array functions only, and a Ray worker
    # that decodes, checks and encodes images then does without torch (~2 s of CPU to import).
    import torch
    import torch.nn.functional as F

    _check_scale(scale)
    if not isinstance(img, torch.Tensor) or not img.is_floating_point():
        what = img.dtype if isinstance(img, torch.Tensor) else type(img).__name__
        raise TypeError(f"img must be a floating torch.Tensor, got {what}")
    if img.dim() not in (3, 4):
        raise ValueError(f"img must be (B, C, H, W) or (C, H, W), got shape {tuple(img.shape)}")
    h, w = img.shape[-2:]
    _check_multiples(h, w, scale)
    x = img.to(torch.float32)
    batched = x.dim() == 4
    if not batched:
        x = x.unsqueeze(0)
    out = F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    # Bicubic overshoots near edges; keep the LR image a valid image.
    out = out.clamp_(0.0, 1.0)
    return out if batched else out.squeeze(0)


def bicubic_downscale_array(img: np.ndarray, scale: int = 4) -> np.ndarray:
    """``bicubic_downscale`` for HxW or HxWxC uint8/uint16 arrays.

    Returns an array of the input's dtype and rank, rounded to the nearest level.
    Raises TypeError for other dtypes, ValueError for bad shapes (see
    ``bicubic_downscale``; use ``modcrop`` first).
    """
    _check_scale(scale)
    img = np.asarray(img)
    if img.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"img must be uint8 or uint16, got dtype {img.dtype}")
    if img.ndim not in (2, 3):
        raise ValueError(f"img must be HxW or HxWxC, got shape {img.shape}")
    h, w = img.shape[:2]
    _check_multiples(h, w, scale)
    return bicubic_resize_array(img, (h // scale, w // scale))


def bicubic_resize_array(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxW or HxWxC uint8/uint16 `img` resized to `size` (height, width) by Pillow's BICUBIC, the
    filter of ``bicubic_downscale``, computed in floating point: each channel as a 32-bit float
    image (Pillow's mode F, which sums in double precision and keeps no 8-bit intermediate, unlike
    its uint8 path), then rounded to the nearest level. Downscaling, it equals ``bicubic_downscale``
    rounded (tests/test_metrics.py), at a third of its time and without torch."""
    peak = float(np.iinfo(img.dtype).max)
    planes = img[..., None] if img.ndim == 2 else img
    out = np.empty((*size, planes.shape[2]), np.float32)
    for c in range(planes.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(planes[..., c], dtype=np.float32))
        out[..., c] = np.asarray(plane.resize((size[1], size[0]), Image.Resampling.BICUBIC))
    out = np.clip(np.round(out), 0, peak).astype(img.dtype)
    return out[..., 0] if img.ndim == 2 else out


def modcrop(img: np.ndarray, scale: int = 4) -> np.ndarray:
    """Crop the bottom/right so H and W are multiples of ``scale`` (BasicSR's mod_crop).

    Works on HxW or HxWxC arrays and returns a view. Raises ValueError if H or W is
    smaller than ``scale`` (nothing would be left) or the array is not at least 2-D.
    """
    _check_scale(scale)
    img = np.asarray(img)
    if img.ndim < 2:
        raise ValueError(f"img must be HxW or HxWxC, got shape {img.shape}")
    h, w = img.shape[:2]
    if h < scale or w < scale:
        raise ValueError(f"image {h}x{w} is smaller than scale={scale}")
    return img[: h - h % scale, : w - w % scale]
