"""jobs/bench.py end to end, small: the sections run and report what RESULTS.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.cluster
def test_quick_bench_writes_the_ratios_and_the_pipeline_matches_the_naive_baseline(tmp_path):
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.md"
    subprocess.run(
        [sys.executable, "jobs/bench.py", "--quick", "--variant", "tiny", "--images", "2",
         "--sections", "model,codecs,skip,precision,pipeline", "--batch-sizes", "1,8", "--dtypes", "float32",
         "--json", str(out), "--markdown", str(table)],
        cwd=ROOT, check=True, timeout=600,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["pipeline_vs_ceiling"] > 0 and result["pipeline_vs_naive"] > 0
    assert result["machine"]["cores"] >= 1 and result["machine"]["date"]
    on_cpu = "gpu" not in result["machine"]
    if on_cpu:  # the features that decide bf16's speed here, which a model name alone does not tell
        assert result["machine"]["cpu_features"] is not None
    pipe = result["pipeline"]
    # Same tiler, model, halo and float32: the same pixels, but for rounding (batches of 8 against 1).
    assert pipe["max_pixel_difference_vs_naive"] <= 1
    for dtype, runs in pipe["runs"].items():  # the default precision, and float32 (the naive baseline's)
        assert runs["pipeline"]["tiles"] >= runs["ceiling"]["tiles"], dtype  # plus the round-trip spot check's
        # On a CPU the ceiling runs as the pipeline's model actors do: one single-threaded process per core.
        assert runs["ceiling"]["processes"] == (result["machine"]["cores"] if on_cpu else 1), dtype
    assert result["pipeline_vs_ceiling"] == pipe["runs"]["float32"]["pipeline_vs_ceiling"]
    assert [r["batch"] for r in result["model"]["rows"]] == [1, 8]
    assert result["model"]["halos"]["4"]["compute_factor"] == pytest.approx((64 / 56) ** 2, abs=1e-3)
    assert {r["format"] for r in result["codecs"]["rows"]} == {"PNG", "JPEG", "WEBP", "AVIF", "JPEG2000", "HEIF"}
    skip = result["skip"]["rows"]
    assert skip[0]["skip_detail"] == 0 and skip[0]["tiles_skipped"] == 0
    assert "pipeline / ceiling" in table.read_text()
    fast = result["precision"]["rows"]
    assert fast and all(r["max_difference"] <= 2 for r in fast), fast  # bf16 against float32, shipped weights
