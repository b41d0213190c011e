"""jobs/bench.py end to end, small: the sections run and report what RESULTS.md quotes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPLIT = ("start_s", "busy_s", "waiting_s", "tail_s", "finish_s")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "jobs" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(tmp_path: Path, *args: str, timeout: int = 300) -> tuple[dict, str]:
    """`python jobs/bench.py --quick --variant tiny ARGS` in a process of its own, as users run it (the
    actor section's processes are spawned, and import the bench by its path): its JSON and Markdown."""
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    subprocess.run(
        [sys.executable, "jobs/bench.py", "--quick", "--variant", "tiny", *args, "--json", str(out),
         "--markdown", str(table)],
        cwd=ROOT, check=True, timeout=timeout,
    )  # fmt: skip
    return json.loads(out.read_text()), table.read_text()


@pytest.mark.slow
@pytest.mark.cluster
def test_quick_bench_writes_the_ratios_and_the_pipeline_matches_the_naive_baseline(tmp_path):
    result, table = run_bench(
        tmp_path, "--images", "2", "--sections", "model,codecs,skip,precision,pipeline", "--batch-sizes", "1,8",
        "--dtypes", "float32", timeout=600,
    )  # fmt: skip
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
        # Where the run's time went, from Ray's task events: every part there, adding up to the run.
        run = runs["pipeline"]
        split = run["time_split"]
        assert sum(split[k] for k in SPLIT) == pytest.approx(run["seconds"], abs=0.03), (dtype, split)
        assert split["start_s"] > 0 and split["busy_s"] > 0 and 0 < run["cores_busy"] <= 1, (dtype, run)
        start = split["before_init_s"] + split["init_s"] + split["first_piece_wait_s"]  # the actors' start-up
        assert start == pytest.approx(split["start_s"], abs=0.03) and split["init_s"] > 0, (dtype, split)
        # One model actor per core; with this tiny model, one that starts late may find no piece left.
        assert 1 <= len(split["actors"]) <= runs["ceiling"]["processes"], (dtype, split)
        if len(split["actors"]) == runs["ceiling"]["processes"]:
            cut = split["model_at_ceiling_s"] + split["slower_than_alone_s"]
            assert cut == pytest.approx(split["busy_s"], abs=0.02), (dtype, split)
        assert runs["binding_stage"].startswith("the "), runs
    # The headline compares like with like: at the naive baseline's precision (float32 on a CPU).
    assert pipe["headline_dtype"] == ("float32" if on_cpu else pipe["default_dtype"])
    assert result["pipeline_vs_ceiling"] == pipe["runs"][pipe["headline_dtype"]]["pipeline_vs_ceiling"]
    assert [r["batch"] for r in result["model"]["rows"]] == [1, 8]
    assert result["model"]["halos"]["4"]["compute_factor"] == pytest.approx((64 / 56) ** 2, abs=1e-3)
    assert {r["format"] for r in result["codecs"]["rows"]} == {"PNG", "JPEG", "WEBP", "AVIF", "JPEG2000", "HEIF"}
    skip = result["skip"]["rows"]
    assert skip[0]["skip_detail"] == 0 and skip[0]["tiles_skipped"] == 0
    assert "pipeline / ceiling" in table and "Binding stage, float32: the " in table
    fast = result["precision"]["rows"]
    assert fast and all(r["max_difference"] <= 2 for r in fast), fast  # bf16 against float32, shipped weights


def test_a_runs_time_split_adds_up_and_counts_an_actors_overlapping_pieces_once(bench):
    spans = [("a", 2.0, 5.0), ("a", 5.1, 9.0), ("a", 8.0, 12.0), ("b", 3.0, 6.0), ("b", 7.0, 11.0)]
    inits = [("a", 0.5, 1.5), ("b", 1.0, 2.5), ("c", 1.0, 2.0)]  # c: an actor that got no piece
    split = bench.time_split(spans, seconds=13.0, inits=inits)
    # Actor a: first piece at 2, busy 3 + 3.9 + 3 (its last two pieces overlap by 1 s), last end 12;
    # actor b: first at 3, busy 3 + 4, last end 11.
    assert [a["busy_s"] for a in split["actors"]] == [9.9, 7.0]
    assert split["start_s"] == 2.5 and split["busy_s"] == 8.45 and split["tail_s"] == 0.5 and split["finish_s"] == 1.0
    assert split["waiting_s"] == pytest.approx(0.55, abs=0.005)
    assert sum(split[k] for k in SPLIT) == pytest.approx(13.0, abs=0.01)
    # Start-up: __init__ begins at 0.5 and 1.0 s and lasts 1 and 1.5 s; the first pieces 0.5 s after.
    assert (split["before_init_s"], split["init_s"], split["first_piece_wait_s"]) == (0.75, 1.25, 0.5)
    # Without every actor's __init__, start-up is left whole.
    assert "init_s" not in bench.time_split(spans, seconds=13.0, inits=inits[:1])


def test_the_binding_stage_is_the_model_only_while_its_actors_are_busy(bench):
    assert bench.binding_stage({"busy_s": 9.5, "waiting_s": 0.5}).startswith("the model (its actors busy 95%")
    assert bench.binding_stage({"busy_s": 8.0, "waiting_s": 2.0}).startswith("the stages around the model")


def test_busy_time_beyond_the_ceilings_rate_counts_the_runs_own_tiles(bench):
    run = {"tiles": 110, "time_split": {"busy_s": 60.0, "actors": [{}, {}]}}
    bench.against_ceiling(run, {"processes": 2, "tiles": 100, "seconds": 50.0})
    assert run["time_split"]["model_at_ceiling_s"] == 55.0 and run["time_split"]["slower_than_alone_s"] == 5.0
    other = {"tiles": 110, "time_split": {"busy_s": 60.0, "actors": [{}]}}  # laid out unlike the ceiling: no cut
    bench.against_ceiling(other, {"processes": 2, "tiles": 100, "seconds": 50.0})
    assert "model_at_ceiling_s" not in other["time_split"]


def test_the_profile_splits_the_models_flops_and_names_its_slowest_kernels(bench, tmp_path):
    """--sections profile (what RESULTS.md's H200 breakdown comes from): the body's and the head's
    FLOPs add up to the forward pass's, each part is timed, and the kernels come slowest first."""
    out, table = tmp_path / "profile.json", tmp_path / "profile.md"
    bench.main(["--sections", "profile", "--variant", "tiny", "--quick", "--batch-sizes", "1,4", "--dtypes",
                "float32", "--json", str(out), "--markdown", str(table)])  # fmt: skip
    profile = json.loads(out.read_text())["profile"]
    assert profile["batch"] == 4 and profile["dtype"] == "float32"
    whole, body, head = profile["rows"]
    assert body["gflop_per_tile"] + head["gflop_per_tile"] == pytest.approx(whole["gflop_per_tile"], abs=0.002)
    for row in profile["rows"]:
        assert row["ms_per_batch"] > 0 and row["tiles_per_s"] == pytest.approx(4e3 / row["ms_per_batch"], rel=0.01)
    kernels = profile["kernels"]["eager"]
    shares = [k["share"] for k in kernels]
    assert kernels and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
    assert any("conv" in k["name"] for k in kernels[:5]), kernels  # the head's convolutions, at 256x256
    assert "Where the model's time goes" in table.read_text()


@pytest.mark.slow
def test_the_actor_section_measures_a_model_actors_own_work_and_its_allocators_fault_less(tmp_path):
    """--sections actor (what RESULTS.md's figures for a GPU actor's CPU work come from): each photo's
    work beside the network, one call at a time and as a GPU actor runs calls, with the allocators'
    defaults and with the model actors' MODEL_ENV. Their faults a photo, one call at a time: 1,723-2,688
    against 194-201 (and 42,000 against 1,600 with numpy's huge pages off); the bound leaves 4x room."""
    result, table = run_bench(tmp_path, "--sections", "actor")
    runs = {(r["environ"], r["calls_at_once"]): r for r in result["actor"]["runs"]}
    assert set(runs) == {(e, n) for e in ("defaults", "MODEL_ENV") for n in (1, 4)}
    for r in runs.values():
        assert r["photos"] == 20 and 0 < r["system_ms_per_photo"] <= r["cpu_ms_per_photo"], r
    default, tuned = runs["defaults", 1]["page_faults_per_photo"], runs["MODEL_ENV", 1]["page_faults_per_photo"]
    assert tuned < default / 4, (tuned, default)
    assert "A model actor's CPU work a photo beside the network" in table


@pytest.mark.slow
def test_the_startup_section_times_a_runs_start_beside_one_actor_on_a_node_of_many_cpus(tmp_path):
    """--sections startup (RESULTS.md's figures for a run's start on a GPU node's many cores): its own
    local Ray of 16 CPUs and 1 GPU, the run's start split from Ray's task events, and the worker
    processes Ray started, counted."""
    result, table = run_bench(tmp_path, "--sections", "startup", "--images", "8")
    startup = result["startup"]
    [run] = startup["runs"]
    assert startup["cpus"] == 16 and startup["images"] == 8
    # The model actor, and at least one process for decoding and finishing, start within the run.
    assert run["workers_started"] >= 2, run
    start = run["before_init_s"] + run["init_s"]  # + the wait for the first piece: each rounded to 0.01 s
    assert 0 < start <= run["start_s"] + 0.02 and run["start_s"] < run["seconds"], run
    assert "A run's start beside one model actor on a node of 16 CPUs" in table


def test_a_processs_role_comes_from_its_title_or_its_program_not_from_its_arguments(bench):
    """A Ray worker that has not yet titled itself names the raylet's socket among its arguments: it is
    a worker, not the raylet (command lines as Ray 2.60 starts them, shortened)."""
    venv = "/w/.venv/lib/python3.11/site-packages/ray"
    role = bench.process_role
    worker = (f"/w/.venv/bin/python {venv}/_private/workers/setup_worker.py {venv}/_private/workers/default_worker.py "
              "--node-ip-address=192.0.2.2 --raylet-name=/tmp/ray/session_x/sockets/raylet --temp-dir=/tmp/ray")  # fmt: skip
    assert role(worker, driver=False) == "other Ray workers"
    assert role("ray::IDLE", driver=False) == "other Ray workers"
    assert role("ray::MapBatches(finish_stage)->Write", driver=False) == "other Ray workers"
    assert role("ray::MapWorker(MapBatches(TileWorker)).submit", driver=False) == "model actors"
    assert role("ray::Assembler.part_done", driver=False) == "Assembler"
    raylet = f"{venv}/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s/sockets/raylet"
    assert role(raylet, driver=False) == "Ray's services"
    # A worker the raylet has just forked, read before it starts its own program: not the raylet.
    assert role(raylet, driver=False, new=True) == "rest of the machine"
    assert role(f"/w/.venv/bin/python -u {venv}/_private/log_monitor.py --session-dir=/tmp/ray/s", driver=False) == (
        "Ray's services"
    )
    assert role("ray::_StatsActor", driver=False) == "Ray's services"
    assert role("/process_api --firecracker-init --addr 0.0.0.0:2024", driver=False) == "rest of the machine"
    assert role("ray::IDLE", driver=True) == "driver"


@pytest.mark.slow
def test_the_cpu_section_puts_every_busy_cpu_second_of_a_run_to_a_process_role(tmp_path):
    """--sections cpu (RESULTS.md's figures for where a run's CPU goes beside the model): every process's
    CPU during one run, by role, adds up to the machine's busy CPU; the model actors are started by the
    run, the driver and Ray's services are not."""
    result, table = run_bench(tmp_path, "--sections", "cpu", "--images", "4")
    cpu = result["cpu"]
    roles = cpu["roles"]
    # Read every 0.5 s, a process that ends loses up to 0.5 s of CPU, and the kernel's interrupts are
    # nobody's: 10 % either way (measured: 14.83 of 14.87 CPU-s busy, tiny, 2 cores).
    total = sum(r["cpu_s"] for r in roles.values())
    assert 0.9 * cpu["cpu_s_busy"] <= total <= 1.1 * cpu["cpu_s_busy"], (total, cpu)
    assert cpu["cpu_s_busy"] <= cpu["cpu_s_available"] * 1.01, cpu
    actors, driver, ray = roles["model actors"], roles["driver"], roles["Ray's services"]
    assert actors["processes"] >= 1 and actors["started"] == actors["processes"] and actors["cpu_s"] > 0, actors
    assert driver["processes"] == 1 and driver["started"] == 0 and driver["cpu_s"] > 0, driver
    assert ray["processes"] >= 2 and ray["started"] == 0, ray  # the raylet and the GCS at least
    assert cpu["model_at_ceiling_cpu_s"] > 0 and 0 < cpu["pipeline_vs_ceiling"] < 1, cpu
    assert "Where a pipeline run's CPU went" in table and all(f"| {role} |" in table for role in roles)
