"""PSNR spot checks (DESIGN.md, "Quality checks"), on numpy images as the pipeline carries them.

- Consistency, every image: the x4 output downscaled by the degradation (model.metrics) against
  the input, colour channels only, on the 8-bit scale. Computed per piece as a sum of squared
  errors so the bands of a large image add up to the image's figure.
- Round trip, a deterministic sample: degrade a centre crop of the input x4, super-resolve it, and
  compare with the crop; the bicubic upscale of the same LR image is the baseline, gain = model -
  bicubic on Y (BT.601), the field's convention.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from model.metrics import bicubic_downscale_array, bicubic_resize_array, psnr

BORDER = 4  # px cropped from each side, as BasicSR does for x4
ROUND_TRIP_CROP = 512  # HR side of the round-trip crop: bounded cost whatever the image size
DEFAULT_SPOT_CHECK_RATE = 0.05


def colour_8bit(pixels: np.ndarray) -> np.ndarray:
    """HxWxC uint8 colour planes of an HxW[xC] uint8/uint16 image (alpha dropped, 16-bit scaled)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] in (2, 4):
        pixels = pixels[..., :-1]
    if pixels.dtype.itemsize == 2:
        pixels = np.round(pixels.astype(np.float32) / 257).astype(np.uint8)
    return pixels


def consistency_sse(
    output_rows: np.ndarray, input_rows: np.ndarray, *, top: bool, bottom: bool, scale: int = 4
) -> tuple[float, int]:
    """(sum of squared errors on the 8-bit scale, value count) between `output_rows` downscaled x`scale`
    and `input_rows`. The 4 px border is left out on the left and right, and on the top/bottom when
    these rows are the image's first/last. Rows too few for the border give (0.0, 0)."""
    out8, in8 = colour_8bit(output_rows), colour_8bit(input_rows)
    down = bicubic_downscale_array(out8, scale).astype(np.float64)
    ref = in8.astype(np.float64)
    y0, y1 = (BORDER if top else 0), ref.shape[0] - (BORDER if bottom else 0)
    x0, x1 = BORDER, ref.shape[1] - BORDER
    if y1 <= y0 or x1 <= x0:
        return 0.0, 0
    diff = down[y0:y1, x0:x1] - ref[y0:y1, x0:x1]
    return float(np.sum(diff * diff)), diff.size


def psnr_from_sse(sse: float, count: int) -> float | None:
    """PSNR in dB on the 8-bit scale; None when nothing was compared, inf when identical."""
    if count == 0:
        return None
    if sse == 0:
        return math.inf
    return 10 * math.log10(255.0**2 / (sse / count))


def in_sample(key: str, rate: float) -> bool:
    """Deterministic: the same key is in the round-trip sample on every run and machine."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest / 2**64 < rate


def choose_sample(keys: list[str], rate: float) -> set[str]:
    """Keys in the round-trip sample at `rate`; at least one when there are keys (the key that
    hashes lowest, so the choice is stable too)."""
    chosen = {k for k in keys if in_sample(k, rate)}
    if keys and not chosen:
        chosen.add(min(keys, key=lambda k: hashlib.sha256(k.encode()).digest()))
    return chosen


@dataclass(frozen=True)
class RoundTripInput:
    reference: np.ndarray  # HxWxC uint8, H and W multiples of 4: the centre crop of the input
    lr: np.ndarray  # its degradation, (H/4)x(W/4)xC uint8


def round_trip_input(pixels: np.ndarray, *, scale: int = 4, crop: int = ROUND_TRIP_CROP) -> RoundTripInput | None:
    """The round trip's reference crop and LR image; None for an image too small to score
    (its LR side would be under 16 px, leaving nothing after the border crop)."""
    colour = colour_8bit(pixels)
    h, w = (min(side, crop) // scale * scale for side in colour.shape[:2])
    if min(h, w) // scale < 16:
        return None
    y0, x0 = (colour.shape[0] - h) // 2, (colour.shape[1] - w) // 2
    reference = np.ascontiguousarray(colour[y0 : y0 + h, x0 : x0 + w])
    lr = bicubic_downscale_array(reference, scale)
    return RoundTripInput(reference, lr)


def bicubic_upscale(lr: np.ndarray, scale: int = 4) -> np.ndarray:
    """The baseline: the same Keys a = -0.5 cubic as the degradation (Pillow's BICUBIC, in floating
    point), upscaling."""
    return bicubic_resize_array(lr, (lr.shape[0] * scale, lr.shape[1] * scale))


def round_trip_scores(sr: np.ndarray, rt: RoundTripInput) -> dict[str, float]:
    """PSNRs (RGB and Y, 4 px border, uint8) of the model's and bicubic's upscale of rt.lr against
    rt.reference, and the gain on Y."""
    sr = colour_8bit(sr)
    bic = bicubic_upscale(rt.lr)
    y = rt.reference.shape[2] == 3  # Y of a grey image is the image itself
    scores = {
        "rt_psnr_model": psnr(sr, rt.reference, crop_border=BORDER),
        "rt_psnr_bicubic": psnr(bic, rt.reference, crop_border=BORDER),
        "rt_psnr_model_y": psnr(sr, rt.reference, crop_border=BORDER, y_channel=y),
        "rt_psnr_bicubic_y": psnr(bic, rt.reference, crop_border=BORDER, y_channel=y),
    }
    scores["rt_gain_db"] = scores["rt_psnr_model_y"] - scores["rt_psnr_bicubic_y"]
    return scores
