"""A run's report: report.json (figures a script can check) and report.html (a page a person reads).

Both are written to DST/_isosr/runs/<run_id>/ beside manifest.parquet and are computed from it alone,
plus a few before/after crops of spot-checked images. The HTML page is self-contained: inline CSS,
images as data: URIs, charts as inline SVG, no scripts and no external resources (a Content-Security-
Policy says so to the browser), so it looks the same opened from a laptop or downloaded from S3.

Quality figures count ok rows only: skipped rows were produced by an earlier run, failed rows have none.
Infinite PSNRs (output identical to the reference) are kept out of means and medians and counted instead.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.manifest import FAILED, OK, SKIPPED

LOW_CONSISTENCY = "low-consistency"

_NEEDED = [
    "key", "status", "error", "width", "height", "out_width", "out_height", "consistency_psnr", "spot_check",
    "rt_psnr_model", "rt_psnr_bicubic", "rt_psnr_model_y", "rt_psnr_bicubic_y", "rt_gain_db", "flags",
    "model_sha256",
]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    min_consistency_psnr: float = 30.0  # dB, per image: below -> flag "low-consistency"
    min_mean_gain_db: float = 0.0  # dB, per job: mean round-trip gain (Y) below -> job flagged


@dataclass(frozen=True)
class Crop:
    """A before/after pair for one spot-checked image, as made by crop_pair."""

    key: str
    before_png: bytes  # input crop, enlarged x4 with nearest-neighbour so both show at the same size
    after_png: bytes  # the same region of the x4 output


# ---------------------------------------------------------------------------------------------- report.json


def summarize(manifest: pa.Table, *, run_id: str, seconds: float, thresholds: Thresholds) -> dict:
    """report.json's content, JSON-serialisable with allow_nan=False (missing or non-finite figures are None).

    Keys: run_id, model_sha256 (sorted distinct digests), seconds, counts {inputs, ok, failed, skipped},
    megapixels_in/out and output_mp_per_s (ok rows), tiles {total, skipped}, consistency_psnr {n, n_infinite, min, median, mean},
    round_trip {n, n_infinite, mean_model_y, mean_bicubic_y, mean_gain_db, mean_model_rgb, mean_bicubic_rgb},
    job_flags (sentences), flagged_images [{key, flags, consistency_psnr}] (ok rows with a manifest flag or
    below thresholds.min_consistency_psnr), failed [{key, error}], thresholds.
    Raises ValueError naming manifest columns that are missing.
    """
    missing = [c for c in _NEEDED if c not in manifest.column_names]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}; expected pipeline.manifest.SCHEMA")
    status = np.array(manifest.column("status").to_pylist(), dtype=object)
    ok = status == OK
    keys = manifest.column("key").to_pylist()

    first_in = _floats(manifest, "width") * _floats(manifest, "height")  # of the first frame
    pixels_in = _floats(manifest, "in_pixels") if "in_pixels" in manifest.column_names else first_in
    pixels_in = np.where(np.isnan(pixels_in), first_in, pixels_in)  # a manifest from before in_pixels
    pixels_out = pixels_in * _floats(manifest, "out_width") * _floats(manifest, "out_height") / first_in
    mp_in = float(np.nansum(pixels_in[ok])) / 1e6
    mp_out = float(np.nansum(pixels_out[ok])) / 1e6

    consistency = _floats(manifest, "consistency_psnr")
    spot = ok & np.array([bool(v) for v in manifest.column("spot_check").to_pylist()], dtype=bool)
    gain = _floats(manifest, "rt_gain_db")
    checked = spot & ~np.isnan(gain)  # NaN: no figure recorded, or inf - inf on a flat image
    round_trip = {
        "n": int(checked.sum()),
        "n_infinite": int(np.isinf(gain[checked]).sum()),
        "mean_model_y": _mean(_floats(manifest, "rt_psnr_model_y")[checked]),
        "mean_bicubic_y": _mean(_floats(manifest, "rt_psnr_bicubic_y")[checked]),
        "mean_gain_db": _mean(gain[checked]),
        "mean_model_rgb": _mean(_floats(manifest, "rt_psnr_model")[checked]),
        "mean_bicubic_rgb": _mean(_floats(manifest, "rt_psnr_bicubic")[checked]),
    }

    counts = {
        "inputs": manifest.num_rows,
        "ok": int(ok.sum()),
        "failed": int((status == FAILED).sum()),
        "skipped": int((status == SKIPPED).sum()),
    }
    digests = sorted({d for d in manifest.column("model_sha256").to_pylist() if d})

    job_flags = []
    mean_gain = round_trip["mean_gain_db"]
    if mean_gain is not None and mean_gain < thresholds.min_mean_gain_db:
        job_flags.append(
            f"mean round-trip gain {mean_gain:.1f} dB below {thresholds.min_mean_gain_db:.1f} dB over "
            f"{round_trip['n']} spot-checked images: wrong weights or broken preprocessing?"
        )
    if not round_trip["n"] and counts["ok"]:  # an all-skipped or all-failed run has nothing to spot-check
        job_flags.append("no round-trip spot check ran")
    if counts["failed"]:
        job_flags.append(f"{counts['failed']} of {counts['inputs']} inputs failed")
    if len(digests) > 1:
        job_flags.append(f"outputs come from {len(digests)} different models: {', '.join(digests)}")

    flags_column = manifest.column("flags").to_pylist()
    flagged = []
    for i in np.flatnonzero(ok):
        flags = [f.strip() for f in (flags_column[i] or "").split(",") if f.strip()]
        if consistency[i] < thresholds.min_consistency_psnr and LOW_CONSISTENCY not in flags:
            flags.append(LOW_CONSISTENCY)
        if flags:
            flagged.append({"key": keys[i], "flags": flags, "consistency_psnr": _finite(consistency[i])})
    errors = manifest.column("error").to_pylist()
    failed = [{"key": keys[i], "error": errors[i] or ""} for i in np.flatnonzero(status == FAILED)]

    return {
        "run_id": run_id,
        "model_sha256": digests,
        "seconds": _finite(seconds),
        "counts": counts,
        "megapixels_in": mp_in,
        "megapixels_out": mp_out,
        "output_mp_per_s": mp_out / seconds if seconds > 0 else None,
        "tiles": {
            "total": int(pc.sum(manifest.column("tiles")).as_py() or 0),
            "skipped": int(pc.sum(manifest.column("tiles_skipped")).as_py() or 0),
        },
        "consistency_psnr": _stats(consistency[ok]),
        "round_trip": round_trip,
        "job_flags": job_flags,
        "flagged_images": sorted(flagged, key=lambda r: r["key"] or ""),
        "failed": sorted(failed, key=lambda r: r["key"] or ""),
        "thresholds": asdict(thresholds),
    }


def _floats(manifest: pa.Table, column: str) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return np.array([np.nan if v is None else v for v in manifest.column(column).to_pylist()], dtype=np.float64)


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def _stats(values: np.ndarray) -> dict:
    """n counts every recorded value; min, median and mean are over the finite ones."""
    values = values[~np.isnan(values)]
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"n": int(values.size), "n_infinite": int(values.size), "min": None, "median": None, "mean": None}
    return {
        "n": int(values.size),
        "n_infinite": int(values.size - finite.size),
        "min": float(finite.min()),
        "median": float(np.median(finite)),
        "mean": float(finite.mean()),
    }


# ---------------------------------------------------------------------------------------------- report.html

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
code, .key { font-family: ui-monospace, monospace; word-break: break-all; }
table { border-collapse: collapse; } td, th { padding: .25em .8em; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warn { background: #fff3cd; border: 2px solid #d39e00; padding: .6em 1em; margin: 1em 0; }
.warn h2 { border: 0; margin: 0 0 .3em; color: #7a5a00; }
.good { background: #e6f4ea; border: 1px solid #81c995; padding: .6em 1em; margin: 1em 0; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure.crop { display: inline-block; margin: 0 1em 1.5em 0; vertical-align: top; }
figure.crop img { border: 1px solid #ccc; margin-right: .3em; max-width: 100%; }
figcaption { max-width: 530px; }
svg .bar { fill: #4a78b5; } svg text { font: 11px system-ui, sans-serif; fill: #333; } svg .axis { stroke: #333; }
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_html(summary: dict, manifest: pa.Table, crops: Sequence[Crop]) -> str:
    """report.html for `summary` (as made by summarize from `manifest`) and the before/after `crops`.

    Self-contained (see the module docstring). Every string from the manifest or the summary is
    HTML-escaped, so keys and errors holding <, &, or quotes show as written.
    """
    e = _esc
    counts = summary["counts"]
    rate = summary["output_mp_per_s"]
    rt = summary["round_trip"]
    cons = summary["consistency_psnr"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>isosr run {e(summary['run_id'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>isosr run <code>{e(summary['run_id'])}</code></h1>",
        '<table class="headline">',
        _row("inputs", counts["inputs"]),
        _row("ok", counts["ok"]),
        _row("failed", counts["failed"]),
        _row("skipped", counts["skipped"]),
        _row("megapixels in → out", f"{summary['megapixels_in']:.2f} → {summary['megapixels_out']:.2f}"),
        _row("network tiles (flat ones skipped)", f"{summary['tiles']['total']:,} ({summary['tiles']['skipped']:,} skipped)"),
        _row("wall time", "–" if summary["seconds"] is None else f"{summary['seconds']:.1f} s"),
        _row("throughput", "–" if rate is None else f"{rate:.2f} output MP/s"),
        _row("consistency PSNR (min / median / mean)", " / ".join(_db(cons[k]) for k in ("min", "median", "mean"))),
        _row("round-trip gain on Y (mean)", f"{_db(rt['mean_gain_db'])} over {rt['n']} spot-checked images"),
        _row("round-trip PSNR on Y, model / bicubic", f"{_db(rt['mean_model_y'])} / {_db(rt['mean_bicubic_y'])}"),
        _row("model sha256", ", ".join(summary["model_sha256"]) or "–"),
        "</table>",
    ]  # fmt: skip

    if summary["job_flags"]:
        items = "".join(f"<li>{e(flag)}</li>" for flag in summary["job_flags"])
        parts.append(f'<div class="warn" role="alert"><h2>Job flags</h2><ul>{items}</ul></div>')
    else:
        parts.append('<div class="good">No job flags.</div>')
    if "nightly" in summary:  # the counts isosr nightly adds (pipeline.nightly)
        parts.append(_nightly_section(summary["nightly"]))

    ok = np.array(manifest.column("status").to_pylist(), dtype=object) == OK
    consistency = _floats(manifest, "consistency_psnr")[ok]
    spot = ok & np.array([bool(v) for v in manifest.column("spot_check").to_pylist()], dtype=bool)
    gains = _floats(manifest, "rt_gain_db")[spot]
    gains = gains[~np.isnan(gains)]
    parts.append('<h2>Quality</h2><div class="charts">')
    parts.append(histogram_svg(consistency.tolist(), title="Consistency PSNR", unit="dB"))
    if gains.size:
        parts.append(histogram_svg(gains.tolist(), title="Round-trip gain on Y (model − bicubic)", unit="dB"))
    parts.append("</div>")
    thresholds = summary["thresholds"]
    parts.append(
        f"<p>Images below {thresholds['min_consistency_psnr']:.1f} dB consistency are flagged; "
        f"the job is flagged when the mean round-trip gain is below {thresholds['min_mean_gain_db']:.1f} dB.</p>"
    )

    if crops:
        by_key = {k: i for i, k in enumerate(manifest.column("key").to_pylist())}
        parts.append("<h2>Before / after</h2><p>Left: the input, enlarged ×4 nearest. Right: the ×4 output.</p>")
        for crop in crops:
            i = by_key.get(crop.key)
            figures = "no manifest row" if i is None else _crop_figures(manifest, i)
            parts.append(
                '<figure class="crop">'
                f'<img src="{_data_uri(crop.before_png)}" alt="input crop of {e(crop.key)}, enlarged x4 nearest">'
                f'<img src="{_data_uri(crop.after_png)}" alt="x4 output crop of {e(crop.key)}">'
                f'<figcaption><span class="key">{e(crop.key)}</span><br>{figures}</figcaption></figure>'
            )

    if summary["failed"]:
        parts.append(f"<h2>Failed inputs ({len(summary['failed'])})</h2><table><tr><th>input</th><th>error</th></tr>")
        parts += [f'<tr><td class="key">{e(r["key"])}</td><td>{e(r["error"])}</td></tr>' for r in summary["failed"]]
        parts.append("</table>")
    if summary["flagged_images"]:
        parts.append(
            f"<h2>Flagged images ({len(summary['flagged_images'])})</h2>"
            "<table><tr><th>image</th><th>flags</th><th>consistency PSNR</th></tr>"
        )
        parts += [
            f'<tr><td class="key">{e(r["key"])}</td><td>{e(", ".join(r["flags"]))}</td>'
            f'<td class="num">{_db(r["consistency_psnr"])}</td></tr>'
            for r in summary["flagged_images"]
        ]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _nightly_section(nightly: dict) -> str:
    """What an incremental run processed and why, what it left alone, and what it resumed."""
    e, c = _esc, nightly["counts"]
    rows = [
        ("new", c["new"]), ("changed", c["changed"]), ("model changed", c["model_changed"]),
        ("output changed (e.g. --format)", c["output_changed"]),
        ("failed before, retried", c["retried"]), ("unchanged", c["unchanged"]),
        ("failed before and unchanged (not retried)", c["failed_unchanged"]), ("gone from SRC", c["gone"]),
    ]  # fmt: skip
    out = ["<h2>Nightly run</h2><table>", *(_row(label, n) for label, n in rows), "</table>"]
    for r in nightly["recovered"]:
        out.append(
            f"<p>Resumed the interrupted run <code>{e(r['run_id'])}</code>: {r['done']} of its {r['planned']} planned "
            f"inputs were done ({r['from_records']} recorded, {r['from_outputs']} found written after its plan); "
            "the others were processed again.</p>"
        )
    if nightly["took_over"]:
        t = nightly["took_over"]
        out.append(
            f"<p>Took over the expired lease of run <code>{e(t['run_id'])}</code> (pid {e(t['pid'])} on host "
            f"{e(t['host'])}, expired {e(t['expires'])}).</p>"
        )
    return "".join(out)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _row(label: str, value: object) -> str:
    return f"<tr><th>{_esc(label)}</th><td>{_esc(value)}</td></tr>"


def _db(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "–"
    return "∞ dB (identical)" if math.isinf(x) else f"{x:.2f} dB"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _crop_figures(manifest: pa.Table, i: int) -> str:
    def value(column: str) -> float | None:
        return manifest.column(column)[i].as_py()

    return _esc(
        f"consistency {_db(value('consistency_psnr'))}; round trip on Y: model {_db(value('rt_psnr_model_y'))}, "
        f"bicubic {_db(value('rt_psnr_bicubic_y'))}, gain {_db(value('rt_gain_db'))}"
    )


def histogram_svg(values: Sequence[float | None], *, title: str, unit: str, bins: int = 20) -> str:
    """An inline SVG histogram of the finite `values` in `bins` equal bins (numpy.histogram's edges over
    min..max). Only non-empty bins get a bar (<rect class="bar">). Infinite and missing (None/NaN)
    values are left out and counted in a note under the chart."""
    arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    n_inf, n_missing = int(np.isinf(arr).sum()), int(np.isnan(arr).sum())
    w, h = 460, 240
    left, right, top, bottom = 48, 12, 28, 52  # margins hold the title, tick labels and axis labels
    pw, ph = w - left - right, h - top - bottom
    e = _esc
    out = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" class="histogram" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{e(title)} histogram">'
        ),
        f'<text x="{w / 2}" y="16" text-anchor="middle" font-weight="bold">{e(title)}</text>',
    ]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if lo == hi:  # one distinct value: give it a bin of width 1 centred on it
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
        top_count = int(counts.max())
        bar_w = pw / bins
        for j, c in enumerate(counts):
            if c:
                bh = ph * c / top_count
                out.append(
                    f'<rect class="bar" data-count="{c}" x="{left + j * bar_w + 0.5:.2f}" y="{top + ph - bh:.2f}" '
                    f'width="{max(bar_w - 1, 0.5):.2f}" height="{bh:.2f}"><title>{edges[j]:.2f}–{edges[j + 1]:.2f} '
                    f"{e(unit)}: {c}</title></rect>"
                )
        digits = 2 if hi - lo < 1 else 1
        for t in np.linspace(lo, hi, 5):
            x = left + pw * (t - lo) / (hi - lo)
            out.append(f'<line class="axis" x1="{x:.2f}" y1="{top + ph}" x2="{x:.2f}" y2="{top + ph + 4}"/>')
            out.append(f'<text x="{x:.2f}" y="{top + ph + 16}" text-anchor="middle">{t:.{digits}f}</text>')
        for c in sorted({0, top_count // 2, top_count}):
            y = top + ph - ph * c / top_count
            out.append(f'<line class="axis" x1="{left - 4}" y1="{y:.2f}" x2="{left}" y2="{y:.2f}"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.2f}" text-anchor="end">{c}</text>')
    else:
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">no values</text>')
    out += [
        f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>',
        f'<text x="{left + pw / 2}" y="{top + ph + 32}" text-anchor="middle">{e(title)} ({e(unit)})</text>',
        f'<text transform="translate(12 {top + ph / 2}) rotate(-90)" text-anchor="middle">images</text>',
    ]
    left_out = [f"{n} infinite" for n in [n_inf] if n] + [f"{n} missing" for n in [n_missing] if n]
    if left_out:
        out.append(
            f'<text class="note" x="{left + pw / 2}" y="{h - 4}" text-anchor="middle">'
            f"not shown: {' and '.join(left_out)} value{'s' if n_inf + n_missing > 1 else ''}</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- crops


def crop_pair(before: np.ndarray, after: np.ndarray, *, size: int = 64, scale: int = 4) -> tuple[bytes, bytes]:
    """PNG bytes of (the size x size input region with the most detail, enlarged `scale`x nearest;
    the matching (size*scale)^2 region of `after`), both as 8-bit.

    Detail is the variance of the grey image over windows on a grid of step size//2 (alpha ignored).
    Takes HxW, HxWx2/3/4 arrays of uint8 or uint16; an input smaller than `size` is used whole.
    Raises ValueError when `after` is not `scale` times `before`'s size, TypeError for other dtypes.
    """
    h, w = before.shape[:2]
    if after.shape[:2] != (h * scale, w * scale):
        raise ValueError(f"output is {after.shape[1]}x{after.shape[0]}, expected {scale}x the input's {w}x{h}")
    before8, after8 = _to_uint8(before), _to_uint8(after)
    ch, cw = min(size, h), min(size, w)
    y0, x0 = _most_detailed(_grey(before8), ch, cw)
    region = before8[y0 : y0 + ch, x0 : x0 + cw]
    enlarged = region.repeat(scale, axis=0).repeat(scale, axis=1)
    out_region = after8[y0 * scale : (y0 + ch) * scale, x0 * scale : (x0 + cw) * scale]
    return _png(enlarged), _png(out_region)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)):
        raise ValueError(f"expected an HxW or HxWx2/3/4 image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise TypeError(f"expected uint8 or uint16 pixels, got {a.dtype}")


def _grey(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        return a.astype(np.float32)
    if a.shape[2] <= 2:  # L or LA: the alpha channel is not detail
        return a[..., 0].astype(np.float32)
    return a[..., :3].mean(axis=2, dtype=np.float32)


def _most_detailed(grey: np.ndarray, ch: int, cw: int) -> tuple[int, int]:
    """Top-left corner of the ch x cw window with the highest variance, among windows on a grid.

    Sums per grid block, then windows as 2x2 blocks: one pass over the image, no per-window loop."""
    h, w = grey.shape
    by, bx = max(ch // 2, 1), max(cw // 2, 1)
    ny, nx = h // by, w // bx
    if ny < 2 or nx < 2:
        return 0, 0
    blocks = grey[: ny * by, : nx * bx].reshape(ny, by, nx, bx)
    s = blocks.sum(axis=(1, 3), dtype=np.float64)
    s2 = np.square(blocks, dtype=np.float64).sum(axis=(1, 3))

    def windows(a: np.ndarray) -> np.ndarray:
        return a[:-1, :-1] + a[1:, :-1] + a[:-1, 1:] + a[1:, 1:]

    n = 4 * by * bx
    variance = windows(s2) / n - (windows(s) / n) ** 2
    i, j = np.unravel_index(int(np.argmax(variance)), variance.shape)
    return min(int(i) * by, h - ch), min(int(j) * bx, w - cw)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return buf.getvalue()
