"""Tests for pipeline.report: report.json figures, HTML escaping, crops, and the page in a real browser.

The browser test drives Debian's chromium (/usr/bin/chromium) through playwright; it is skipped where
either is missing, except under CI (the CI environment variable set), where it must run.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.manifest import table
from pipeline.report import Crop, Thresholds, crop_pair, histogram_svg, render_html, summarize

HOSTILE = "<script>alert(1)</script>&\"'.png"
SHA = "ab" * 32


def _ok(key: str, consistency: float | None, **extra: object) -> dict[str, object]:
    row = {"run_id": "r1", "key": key, "status": "ok", "width": 100, "height": 50, "out_width": 400, "out_height": 200}
    row.update(consistency_psnr=consistency, spot_check=False, model_sha256=SHA)
    row.update(extra)
    return row


def _spot(key: str, consistency: float, model_y: float, bicubic_y: float) -> dict[str, object]:
    return _ok(
        key, consistency, spot_check=True, rt_psnr_model=model_y - 1, rt_psnr_bicubic=bicubic_y - 1,
        rt_psnr_model_y=model_y, rt_psnr_bicubic_y=bicubic_y, rt_gain_db=model_y - bicubic_y,
    )  # fmt: skip


def _manifest(gains: tuple[float, float] = (1.0, 2.0)):
    """5 ok images (2 spot-checked with Y gains `gains`, 1 below 30 dB, 1 identical), 1 failed, 1 skipped."""
    return table(
        [
            _spot("a.png", 40.0, 30.0, 30.0 - gains[0]),
            _spot("b.png", 36.0, 28.0, 28.0 - gains[1]),
            _ok("c.png", 25.0),  # below the 30 dB default
            _ok("d.png", math.inf),  # identical: kept out of the means
            _ok("e.png", None, flags="seam"),
            {"run_id": "r1", "key": HOSTILE, "status": "failed", "error": "cannot identify image <bytes> & co"},
            {
                "run_id": "r1",
                "key": "old.png",
                "status": "skipped",
                "error": "output exists",
                "width": 10,
                "height": 10,
            },
        ]
    )


# ------------------------------------------------------------------------------------------------ summarize


def test_summarize_figures() -> None:
    s = summarize(_manifest(), run_id="r1", seconds=2.0, thresholds=Thresholds())
    assert s["run_id"] == "r1" and s["model_sha256"] == [SHA]
    assert s["counts"] == {"inputs": 7, "ok": 5, "failed": 1, "skipped": 1}
    assert s["megapixels_in"] == pytest.approx(5 * 100 * 50 / 1e6, rel=1e-12)  # ok rows only
    assert s["megapixels_out"] == pytest.approx(5 * 400 * 200 / 1e6, rel=1e-12)
    assert s["output_mp_per_s"] == pytest.approx(0.4 / 2.0, rel=1e-12)

    c = s["consistency_psnr"]
    assert (c["n"], c["n_infinite"]) == (4, 1)  # e.png has none; d.png is infinite
    assert c["min"] == pytest.approx(25.0, abs=1e-9)
    assert c["median"] == pytest.approx(36.0, abs=1e-9)
    assert c["mean"] == pytest.approx((40 + 36 + 25) / 3, abs=1e-9)

    rt = s["round_trip"]
    assert rt["n"] == 2
    assert rt["mean_gain_db"] == pytest.approx(1.5, abs=1e-9)
    assert rt["mean_model_y"] == pytest.approx(29.0, abs=1e-9)
    assert rt["mean_bicubic_y"] == pytest.approx(27.5, abs=1e-9)
    assert rt["mean_model_rgb"] == pytest.approx(28.0, abs=1e-9)
    assert rt["mean_bicubic_rgb"] == pytest.approx(26.5, abs=1e-9)

    assert s["failed"] == [{"key": HOSTILE, "error": "cannot identify image <bytes> & co"}]
    assert s["flagged_images"] == [
        {"key": "c.png", "flags": ["low-consistency"], "consistency_psnr": 25.0},
        {"key": "e.png", "flags": ["seam"], "consistency_psnr": None},
    ]
    assert s["job_flags"] == ["1 of 7 inputs failed"]  # gain 1.5 dB is above the 0 dB threshold
    assert s["thresholds"] == {"min_consistency_psnr": 30.0, "min_mean_gain_db": 0.0}
    json.dumps(s, allow_nan=False)


def test_low_mean_gain_flags_the_job() -> None:
    s = summarize(_manifest(gains=(-0.5, -1.1)), run_id="r1", seconds=2.0, thresholds=Thresholds())
    assert s["round_trip"]["mean_gain_db"] == pytest.approx(-0.8, abs=1e-9)
    assert any(f.startswith("mean round-trip gain -0.8 dB below 0.0 dB") for f in s["job_flags"])
    # The same run judged against a laxer threshold is not flagged.
    lax = summarize(_manifest(gains=(-0.5, -1.1)), run_id="r1", seconds=2.0, thresholds=Thresholds(min_mean_gain_db=-1))
    assert not any("round-trip gain" in f for f in lax["job_flags"])


def test_no_spot_check_is_a_job_flag() -> None:
    s = summarize(table([_ok("a.png", 40.0)]), run_id="r1", seconds=1.0, thresholds=Thresholds())
    assert s["round_trip"]["n"] == 0 and s["round_trip"]["mean_gain_db"] is None
    assert s["job_flags"] == ["no round-trip spot check ran"]


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [{"key": "x.png", "status": "failed", "error": "empty file (0 bytes)"}],
        [_ok("nan.png", math.nan), _ok("inf.png", math.inf, spot_check=True, rt_gain_db=math.nan)],
    ],
    ids=["empty", "all-failed", "nan-and-inf"],
)
def test_degenerate_runs_give_valid_json_and_html(rows: list[dict[str, object]]) -> None:
    manifest = table(rows)
    s = summarize(manifest, run_id="r1", seconds=0.0, thresholds=Thresholds())
    json.dumps(s, allow_nan=False)
    assert s["output_mp_per_s"] is None and s["consistency_psnr"]["mean"] is None
    page = render_html(s, manifest, [])
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>")


# ------------------------------------------------------------------------------------------------ HTML


def test_render_html_escapes_manifest_text() -> None:
    manifest = _manifest()
    s = summarize(manifest, run_id="r1", seconds=2.0, thresholds=Thresholds())
    tiny = np.zeros((8, 8, 3), np.uint8)
    page = render_html(s, manifest, [Crop(HOSTILE, *crop_pair(tiny, np.zeros((32, 32, 3), np.uint8)))])
    assert HOSTILE not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;&#x27;.png" in page
    assert "cannot identify image &lt;bytes&gt; &amp; co" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_histogram_skips_infinite_and_missing_values_and_says_so() -> None:
    svg = histogram_svg([30.0, 31.0, 31.0, math.inf, None, math.nan], title="PSNR", unit="dB", bins=4)
    assert svg.count('class="bar"') == 2  # 30 in the first bin, both 31s in the last
    assert 'data-count="2"' in svg
    assert "not shown: 1 infinite and 2 missing values" in svg
    assert "no values" in histogram_svg([math.inf], title="PSNR", unit="dB")
    assert histogram_svg([5.0, 5.0], title="PSNR", unit="dB").count('class="bar"') == 1  # one distinct value


# ------------------------------------------------------------------------------------------------ crops


def _png_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.mark.parametrize(
    ("shape", "dtype", "crop"),
    [
        ((100, 120, 3), np.uint8, 64),
        ((100, 120), np.uint8, 64),
        ((100, 120, 2), np.uint8, 64),
        ((100, 120, 4), np.uint8, 64),
        ((100, 120), np.uint16, 64),
        ((20, 30, 3), np.uint8, None),  # smaller than the crop: the whole image
    ],
    ids=["rgb", "grey", "grey-alpha", "rgba", "uint16", "tiny"],
)
def test_crop_pair_sizes(shape: tuple[int, ...], dtype: type, crop: int | None) -> None:
    rng = np.random.default_rng(0)
    before = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    after = before.repeat(4, axis=0).repeat(4, axis=1)
    before_png, after_png = crop_pair(before, after)
    b, a = _png_array(before_png), _png_array(after_png)
    h, w = (crop, crop) if crop else shape[:2]
    assert b.shape[:2] == a.shape[:2] == (4 * h, 4 * w)
    assert b.shape[2:] == a.shape[2:] == shape[2:] and b.dtype == a.dtype == np.uint8
    # `after` is `before` enlarged nearest here, so the two crops must be the same picture.
    np.testing.assert_array_equal(b, a)


def test_crop_pair_picks_the_detailed_region() -> None:
    before = np.full((300, 400, 3), 128, np.uint8)
    patch = skimage.data.astronaut()[200:264, 200:264]  # the face: lots of detail
    before[150:214, 250:314] = patch
    after = before.repeat(4, axis=0).repeat(4, axis=1)
    b, a = (_png_array(png) for png in crop_pair(before, after))
    # The grid steps by 32, so the chosen window holds the whole patch or most of it, never flat grey only.
    assert b[::4, ::4].std() > 20 and a[::4, ::4].std() > 20
    assert (b[::4, ::4] != 128).any(axis=2).mean() > 0.5


def test_crop_pair_rejects_a_wrong_output_size() -> None:
    with pytest.raises(ValueError, match="expected 4x"):
        crop_pair(np.zeros((10, 10), np.uint8), np.zeros((30, 40), np.uint8))


# ------------------------------------------------------------------------------------------------ browser


def _photo_crop(key: str, photo: np.ndarray) -> Crop:
    """A real photo as the input, its bicubic x4 as the output (the pipeline's output stands in here)."""
    img = Image.fromarray(photo)
    after = np.asarray(img.resize((img.width * 4, img.height * 4), Image.Resampling.BICUBIC))
    return Crop(key, *crop_pair(photo, after))


def test_report_renders_in_a_browser(browser, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    consistency = rng.normal(38.0, 4.0, 30)
    rows = [_ok(f"img{i:02d}.png", float(v)) for i, v in enumerate(consistency)]
    rows += [
        _spot("astronaut.png", 41.0, 29.0, 29.8),
        _spot("coffee.png", 35.0, 31.0, 31.8),
        _ok("flat.png", math.inf),
        {"run_id": "r1", "key": HOSTILE, "status": "failed", "error": "truncated file: 17 of 2048 bytes"},
    ]
    manifest = table(rows)
    summary = summarize(manifest, run_id="r1", seconds=3.0, thresholds=Thresholds())
    crops = [
        _photo_crop("astronaut.png", skimage.data.astronaut()[::4, ::4]),
        _photo_crop("coffee.png", skimage.data.coffee()[::4, ::4]),
    ]
    path = tmp_path / "report.html"
    path.write_text(render_html(summary, manifest, crops), encoding="utf-8")

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: r.url.startswith(("file:", "data:")) or problems.append(f"went out: {r.url}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(path.as_uri(), wait_until="load")

    # The crops decode: 64x64 regions shown x4.
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
    assert images == [[True, 256, 256]] * 4

    # The consistency histogram has one bar per non-empty bin, every one with a height.
    expected_counts = np.histogram(list(consistency) + [41.0, 35.0], bins=20)[0]
    histograms = page.locator("svg.histogram")
    assert histograms.count() == 2  # consistency and round-trip gain
    heights = histograms.nth(0).locator("rect.bar").evaluate_all("rs => rs.map(r => r.getBBox().height)")
    assert len(heights) == np.count_nonzero(expected_counts) and min(heights) > 0
    assert page.get_by_text("Consistency PSNR (dB)").is_visible()
    assert page.get_by_text("not shown: 1 infinite value").is_visible()

    warning = page.locator(".warn")
    assert warning.is_visible()
    assert "mean round-trip gain -0.8 dB below 0.0 dB" in warning.inner_text()
    assert page.get_by_text(HOSTILE, exact=True).is_visible()  # shown as written, not run
    assert page.get_by_text("truncated file: 17 of 2048 bytes").is_visible()

    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    assert len(shot.getcolors(maxcolors=shot.width * shot.height)) > 1000  # photos, bars, text: not blank
    assert problems == []
    page.close()
