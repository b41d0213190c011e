"""`isosr nightly`: incremental runs, the lease, resuming an interrupted run, and the schedule templates.

What a user would notice: a night that redoes work it did before, or misses a new or changed input;
an input processed twice, or lost, after a run was killed; two runs at once on one DST, or a run that
waits forever behind a dead one; a bad file retried every night; a night with nothing to do that
takes minutes; a schedule manifest that Kubernetes or KubeRay would reject. Everything runs for real:
moto's S3 server, local folders, a local Ray (conftest's `ray_local`, or the job's own in a subprocess).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline import nightly, storage
from pipeline.cli import EXIT_OK, EXIT_SOME_FAILED, main
from pipeline.lease import Lease, LeaseHeld, LeaseLost
from pipeline.manifest import OK, table
from pipeline.nightly import EXIT_LEASE
from tests.sessions import assert_session_gone, kill_session

REPO = Path(__file__).resolve().parent.parent
RUNS = "_isosr/runs"


def png(seed: int, size: int = 24) -> bytes:
    """A small random RGB PNG; different seeds give different bytes (so a different ETag)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)


def run_dir_of(out: str) -> str:
    """The run folder the summary names ("manifest and report: DIR/")."""
    [found] = re.findall(r"^manifest and report: (.+?)/?$", out, re.MULTILINE)
    return found


def processed(rows: list[dict]) -> list[str]:
    """Keys a run processed (ok or failed), from its manifest; the rest are skipped rows."""
    return sorted(r["key"] for r in rows if r["status"] != "skipped")


def no_ray_address() -> dict[str, str]:
    """This environment without RAY_ADDRESS, so that a subprocess starts its own local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


# ----------------------------------------------------------------------------- what changed (no Ray)


def test_diff_processes_new_changed_and_new_model_and_retries_failures_only_when_asked() -> None:
    def record(key: str, size: int, version: str, status: str = OK, model: str = "m1", output: str = "") -> dict:
        return {"key": key, "size_bytes": size, "source_version": version, "model_sha256": model, "status": status,
                "error": None if status == OK else "bad", "output": None if status != OK else output or f"out/{key}",
                "run_id": "r1", "recovered": None}  # fmt: skip

    def listed(key: str, size: int, version: str) -> storage.InputFile:
        return storage.InputFile(f"src/{key}", key, size, version)

    records = {r["key"]: r for r in [
        record("same.png", 10, "v1"), record("bigger.png", 10, "v1"), record("touched.png", 10, "v1"),
        record("old-model.png", 10, "v1", model="m0"), record("was-jpeg.png", 10, "v1", output="out/was-jpeg.jpg"),
        record("bad.png", 3, "v1", status="failed"), record("bad-fixed.png", 3, "v1", status="failed"),
        record("deleted.png", 10, "v1"),
    ]}  # fmt: skip
    inputs = [
        listed("same.png", 10, "v1"), listed("bigger.png", 11, "v1"), listed("touched.png", 10, "v2"),
        listed("old-model.png", 10, "v1"), listed("was-jpeg.png", 10, "v1"), listed("bad.png", 3, "v1"),
        listed("bad-fixed.png", 900, "v2"), listed("brand-new.png", 10, "v1"),
    ]  # fmt: skip

    def sort(model: str = "m1", retry_failed: bool = False) -> nightly.Diff:
        return nightly.diff(
            inputs, records, model_version=model, output=lambda k: f"out/{k}", retry_failed=retry_failed
        )

    d = sort()
    assert d.todo == {"bigger.png": "changed", "touched.png": "changed", "old-model.png": "model",
                      "was-jpeg.png": "output", "bad-fixed.png": "changed", "brand-new.png": "new"}  # fmt: skip
    assert d.unchanged == ["same.png"] and d.failed_unchanged == ["bad.png"] and d.gone == ["deleted.png"]
    assert d.counts() == {"new": 1, "changed": 3, "model_changed": 1, "output_changed": 1, "retried": 0,
                          "unchanged": 1, "failed_unchanged": 1, "gone": 1}  # fmt: skip

    retried = sort(retry_failed=True)
    assert retried.todo["bad.png"] == "retry" and retried.failed_unchanged == []
    assert set(sort(model="m2").todo) == {f.key for f in inputs}  # a new model redoes everything, failures included


# ----------------------------------------------------------------------------- the lease (no Ray)


@pytest.fixture(params=["local", "s3"])
def lease_dst(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A DST for lease tests: a local folder, or a prefix in a fresh bucket on the local S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "dst")
    bucket, _ = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/dst"


def test_a_held_lease_refuses_a_second_run_and_says_who_holds_it_and_what_to_do(lease_dst: str) -> None:
    first = Lease(lease_dst, run_id="20261121T010000Z-aaaaaa", ttl_s=60)
    assert first.acquire() is None
    second = Lease(lease_dst, run_id="20261121T010005Z-bbbbbb", ttl_s=60)
    with pytest.raises(LeaseHeld) as refused:
        second.acquire()
    message = str(refused.value)
    lease_uri = storage.join(lease_dst, "_isosr/nightly/lease.json")
    for needed in ("20261121T010000Z-aaaaaa", f"pid {os.getpid()}", f"host {socket.gethostname()}", "since ",
                   "expires ", f"delete {lease_uri}", "Nothing was done", "_isosr/runs/20261121T010000Z-aaaaaa/"):  # fmt: skip
        assert needed in message, (needed, message)
    assert re.search(r"\(in (59 s|1 min 0 s)\)", message), message  # lease times have 1 s resolution

    first.release()  # a released lease is free at once, and taking it is no takeover
    assert second.acquire() is None
    with pytest.raises(LeaseLost):
        first.renew()  # the first run no longer holds it


def test_a_stale_lease_is_taken_over_and_its_holder_learns_it_lost_it(lease_dst: str) -> None:
    dead = Lease(lease_dst, run_id="20261121T010000Z-dead00", ttl_s=1)
    dead.acquire()
    with pytest.raises(LeaseHeld):
        Lease(lease_dst, run_id="20261121T010000Z-early0", ttl_s=60).acquire()  # not expired yet
    time.sleep(2.1)  # past its expiry (lease times have 1 s resolution)
    heir = Lease(lease_dst, run_id="20261121T010003Z-heir00", ttl_s=60)
    previous = heir.acquire()
    assert previous is not None and previous.run_id == "20261121T010000Z-dead00" and previous.pid == os.getpid()
    with pytest.raises(LeaseLost, match="20261121T010003Z-heir00"):
        dead.renew()  # a holder that comes back finds the lease taken
    heir.renew()
    heir.release()


RACER = """
import sys
from pipeline.lease import Lease, LeaseHeld
lease = Lease(sys.argv[1], run_id=sys.argv[2], ttl_s=60)
print("ready", flush=True)
sys.stdin.readline()  # the start signal, sent to every racer at once
try:
    previous = lease.acquire()
    print("won", previous.run_id if previous else "-")
except LeaseHeld:
    print("refused")
"""


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_processes_racing_for_a_lease_exactly_one_wins(lease_dst: str, stale: bool) -> None:
    """Separate processes (as separate machines would be), released at one instant, race to create
    the lease or to take over a stale one; exactly one may win, whatever the store."""
    if stale:
        Lease(lease_dst, run_id="20261121T000000Z-dead00", ttl_s=1).acquire()
        time.sleep(2.1)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, lease_dst, f"20261121T010000Z-race{i:02d}"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for racer in racers:
        assert racer.stdout.readline() == "ready\n", racer.communicate(timeout=60)[1]
    for racer in racers:
        racer.stdin.write("go\n")
        racer.stdin.flush()
    outcomes = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        outcomes.append(out.split())
    winners = [o for o in outcomes if o[0] == "won"]
    assert len(winners) == 1 and sum(o == ["refused"] for o in outcomes) == 3, outcomes
    assert winners[0][1] == ("20261121T000000Z-dead00" if stale else "-")


def test_threads_racing_on_s3_take_the_lease_once(s3_bucket: tuple[str, object]) -> None:
    """Many contenders at once on S3: the conditional PUTs (If-None-Match, then If-Match on the stale
    lease's ETag) let exactly one through each time."""
    bucket, _ = s3_bucket
    dst = f"s3://{bucket}/dst"

    def contend(run_id: str, barrier: threading.Barrier) -> str:
        lease = Lease(dst, run_id=run_id, ttl_s=3)
        barrier.wait()
        try:
            lease.acquire()
            return "won"
        except LeaseHeld:
            return "refused"

    for round_ in range(2):  # round 0: no lease yet; round 1: the winner's lease has expired
        barrier = threading.Barrier(8)
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(contend, [f"20261121T01000{round_}Z-t{i:05d}" for i in range(8)], [barrier] * 8))
        assert outcomes.count("won") == 1, outcomes
        time.sleep(3.1)


# ----------------------------------------------------------------------------- resuming (no Ray)


def test_an_output_written_after_the_plan_but_before_its_record_counts_as_done(tmp_path: Path) -> None:
    """The window a kill can hit: the output of an input is written, its manifest part is not yet.
    Recovery counts it as done (its output is newer than the run's plan); an output older than the
    plan (from an earlier run) does not count, and the input is redone. Made here as a killed run
    leaves it on disk, since a real kill lands in this window only by chance."""
    dst = str(tmp_path / "dst")
    run_id = "20261121T020000Z-killed"
    keys = ["recorded.png", "written.png", "old-output.png", "untouched.png"]
    plan_rows = [
        {"key": k, "size_bytes": 100, "source_version": "v1", "output": f"{dst}/{k}", "status": OK} for k in keys
    ]
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "old-output.png").write_bytes(b"from an earlier run")
    os.utime(tmp_path / "dst" / "old-output.png", (time.time() - 3600,) * 2)
    nightly.write_plan(dst, run_id, plan_rows, dict.fromkeys(keys, "new"), model_version="m1")
    time.sleep(0.05)
    (tmp_path / "dst" / "recorded.png").write_bytes(b"x4")
    (tmp_path / "dst" / "written.png").write_bytes(b"x4")  # ... and then the driver was killed
    (tmp_path / "dst" / ".untouched.png.tmp-4242-0123abcd").write_bytes(b"half an output")
    part = nightly.RunPaths(dst=dst, run_id=run_id).part("only")
    storage.write_atomic(part, _parquet(table([{**plan_rows[0], "run_id": run_id}])))

    state = nightly.load_state(dst)
    assert [p[0] for p in state.plans] == [run_id] and state.records == {}
    [summary] = nightly.recover(dst, state)

    assert summary == {"run_id": run_id, "planned": 4, "done": 2, "from_records": 1, "from_outputs": 1}
    assert {k: (r["status"], r["recovered"], r["run_id"]) for k, r in state.records.items()} == {
        "recorded.png": (OK, "parts", run_id),
        "written.png": (OK, "output", run_id),
    }
    assert not (tmp_path / "dst" / ".untouched.png.tmp-4242-0123abcd").exists()  # the cut-off write is cleaned up
    remaining = nightly.diff(
        [storage.InputFile(f"src/{k}", k, 100, "v1") for k in keys],
        state.records,
        model_version="m1",
        output=lambda k: f"{dst}/{k}",
        retry_failed=False,
    )
    assert sorted(remaining.todo) == ["old-output.png", "untouched.png"]


def _parquet(t: object) -> bytes:
    sink = io.BytesIO()
    pq.write_table(t, sink)
    return sink.getvalue()


# ----------------------------------------------------------------------------- whole runs (Ray)


@pytest.mark.cluster
def test_each_night_processes_exactly_the_new_changed_and_retried_inputs(
    ray_local: None, s3_bucket: tuple[str, object], tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket, client = s3_bucket
    src, dst = f"s3://{bucket}/in", f"s3://{bucket}/out"

    def put(key: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=data)

    def outputs() -> dict[str, tuple[str, object]]:
        """Output key -> (ETag, LastModified): what a rewrite would change."""
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/")
        objects = [o for page in pages for o in page.get("Contents", []) if "/_isosr/" not in o["Key"]]
        return {o["Key"][len("out/") :]: (o["ETag"], o["LastModified"]) for o in objects}

    def night(*extra: str) -> tuple[int, dict, list[dict]]:
        status = main(["nightly", src, dst, "--checkpoint", tiny_checkpoint, "--spot-check-rate", "0", *extra])
        run_key = run_dir_of(capsys.readouterr().out).removeprefix(f"s3://{bucket}/")
        report = client.get_object(Bucket=bucket, Key=f"{run_key}/report.json")["Body"].read()
        manifest = client.get_object(Bucket=bucket, Key=f"{run_key}/manifest.parquet")["Body"].read()
        return status, json.loads(report), pq.read_table(io.BytesIO(manifest)).to_pylist()

    good = ["a/0.png", "a/1.png", "a/2.png", "b/deep/3.png", "c 4.png", "ü5.png"]
    for i, key in enumerate(good):
        put(key, png(i))
    put("bad.png", b"this is not an image")

    status, report, rows = night()
    assert status == EXIT_SOME_FAILED  # bad.png: listed, and the rest went on
    assert processed(rows) == sorted(good + ["bad.png"])
    assert report["nightly"]["counts"]["new"] == 7
    first = outputs()
    assert sorted(first) == sorted(good)
    assert all(Image.open(io.BytesIO(client.get_object(Bucket=bucket, Key=f"out/{k}")["Body"].read())).size == (96, 96)
               for k in good)  # fmt: skip

    status, report, rows = night()
    assert status == EXIT_OK
    assert processed(rows) == []  # nothing done twice ...
    assert len(rows) == 7 and {r["status"] for r in rows} == {"skipped"}  # ... and every input accounted for
    assert outputs() == first  # not one output rewritten
    counts = report["nightly"]["counts"]
    assert (counts["unchanged"], counts["failed_unchanged"], report["nightly"]["processed"]) == (6, 1, 0)
    [bad_row] = [r for r in rows if r["key"] == "bad.png"]
    assert "failed in run" in bad_row["error"] and "--retry-failed" in bad_row["error"]

    put("d/new 6.png", png(6))
    put("a/new7.png", png(7))
    put("a/1.png", png(101))  # changed: new content, same key
    status, report, rows = night()
    assert status == EXIT_OK
    assert processed(rows) == ["a/1.png", "a/new7.png", "d/new 6.png"]
    assert {k: report["nightly"]["counts"][k] for k in ("new", "changed", "unchanged")} == {
        "new": 2,
        "changed": 1,
        "unchanged": 5,
    }
    third = outputs()
    assert sorted(k for k in third if third[k] != first.get(k)) == ["a/1.png", "a/new7.png", "d/new 6.png"]

    status, report, rows = night("--retry-failed")
    assert status == EXIT_SOME_FAILED and processed(rows) == ["bad.png"]  # still bad, retried on request only
    assert report["nightly"]["counts"]["retried"] == 1 and outputs() == third

    state = client.list_objects_v2(Bucket=bucket, Prefix="out/_isosr/nightly/state/")["Contents"]
    names = [o["Key"].rsplit("/", 1)[1] for o in state]
    assert all(n.startswith("snapshot-") for n in names) and len(names) == nightly.KEEP_SNAPSHOTS  # no plan left


@pytest.mark.cluster
def test_a_second_run_while_one_works_refuses_with_exit_4_and_the_first_completes(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {f"{i}.png": png(i) for i in range(8)})
    args = ["nightly", str(src), str(dst), "--checkpoint", tiny_checkpoint, "--spot-check-rate", "0"]
    first: dict[str, int] = {}
    worker = threading.Thread(target=lambda: first.setdefault("status", main(args)))
    worker.start()
    lease = dst / "_isosr" / "nightly" / "lease.json"
    deadline = time.monotonic() + 120
    while not (lease.exists() and json.loads(lease.read_text())["released"] is None):
        assert time.monotonic() < deadline and worker.is_alive(), "the first run never took the lease"
        time.sleep(0.01)
    holder = json.loads(lease.read_text())

    second = main(args)
    worker.join(timeout=300)

    assert second == EXIT_LEASE
    assert first["status"] == EXIT_OK
    err = capsys.readouterr().err
    [refusal] = [line for line in err.splitlines() if "holds the lease" in line]
    for needed in (
        holder["run_id"],
        f"pid {os.getpid()}",
        socket.gethostname(),
        f"expires {holder['expires']}",
        str(lease),
    ):
        assert needed in refusal, (needed, refusal)
    [run] = (dst / "_isosr" / "runs").iterdir()  # the refused run wrote nothing
    assert processed(pq.read_table(run / "manifest.parquet").to_pylist()) == [f"{i}.png" for i in range(8)]


@pytest.mark.cluster
@pytest.mark.slow
def test_a_run_killed_halfway_is_resumed_with_exactly_the_remainder(
    ray_local: None, tmp_path: Path, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The driver (`python jobs/nightly.py`, its own local Ray) is SIGKILLed once some outputs are
    recorded. The next run waits out the dead run's lease, takes it over, counts what the dead run
    finished as done and processes exactly the rest: every input once, none lost, none rewritten."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    n = 16
    keys = [f"{i:02d}.png" for i in range(n)]
    write_tree(src, {k: png(i, size=40) for i, k in enumerate(keys)})
    args = [str(src), str(dst), "--checkpoint", tiny_checkpoint, "--spot-check-rate", "0", "--lease-ttl", "8"]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        job = subprocess.Popen([sys.executable, "jobs/nightly.py", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                               env=no_ray_address(), start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(list(dst.glob(f"{RUNS}/*/parts/*.parquet"))) < 3:
            assert job.poll() is None, f"the job ended before it could be killed:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no outputs recorded in time:\n{log.read_text()}"
            time.sleep(0.02)
        kill_session(job.pid)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            kill_session(job.pid)
    [killed_dir] = (dst / "_isosr" / "runs").iterdir()
    killed_run = killed_dir.name
    assert main(["nightly", *args]) == EXIT_LEASE  # the dead run's lease is not expired yet
    assert killed_run in capsys.readouterr().err
    assert_session_gone(job.pid)  # from here on nothing of the killed job can write
    killed_at = time.time()
    assert not (killed_dir / "manifest.parquet").exists()  # it died mid-run
    recorded = {r["key"] for p in killed_dir.glob("parts/*.parquet") for r in pq.read_table(p).to_pylist()}
    assert 3 <= len(recorded) < n, f"killed too late to leave a remainder: {len(recorded)} of {n} recorded"
    written = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.png")}
    assert recorded <= set(written)
    expires = datetime_of(json.loads((dst / "_isosr/nightly/lease.json").read_text())["expires"])
    time.sleep(max(0.0, expires - time.time() + 1.1))

    assert main(["nightly", *args]) == EXIT_OK
    out, err = capsys.readouterr()
    resumed_dir = Path(run_dir_of(out))
    resumed = pq.read_table(resumed_dir / "manifest.parquet").to_pylist()
    report = json.loads((resumed_dir / "report.json").read_text())
    state = nightly.load_state(str(dst)).records

    by_killed = {k for k, r in state.items() if r["run_id"] == killed_run}
    by_resumed = set(processed(resumed))
    assert recorded <= by_killed  # every recorded output counts as done ...
    assert by_killed | by_resumed == set(keys) and not by_killed & by_resumed  # ... each input exactly once
    assert {r["status"] for r in resumed if r["key"] in by_resumed} == {OK}
    assert all(written[k] == (dst / k).stat().st_mtime_ns for k in by_killed), "an output of the dead run was rewritten"
    assert all((dst / k).stat().st_mtime > killed_at for k in by_resumed)
    assert f"took over the expired lease of run {killed_run}" in err
    [recovery] = report["nightly"]["recovered"]
    assert (recovery["run_id"], recovery["planned"], recovery["done"]) == (killed_run, n, len(by_killed))
    assert report["nightly"]["took_over"]["run_id"] == killed_run
    assert not [p for p in dst.rglob("*") if ".tmp-" in p.name]  # no half-written file left behind
    assert not list(dst.glob("_isosr/nightly/state/plan-*"))  # the dead run's plan is folded in


def datetime_of(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


# ----------------------------------------------------------------------------- a night with nothing to do


NIGHT_WITHOUT_RAY = """
import sys
from pipeline.cli import main
status = main(["nightly", *sys.argv[1:]])
import ray
print("ray started:", ray.is_initialized())
sys.exit(status)
"""


@pytest.mark.slow
def test_a_night_over_1000_unchanged_objects_takes_seconds_and_starts_no_ray(
    s3_bucket: tuple[str, object], tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """1,000 objects on the local S3 endpoint, all processed before: the night lists them, reads the
    state, finds nothing to do and writes its report, end to end (a fresh interpreter) well under 30 s.

    The state of 1,000 processed inputs is written by nightly.commit from the real listing and the
    real model version: exactly what a first run that processed them leaves (the Ray pipeline on
    1,000 tiny images takes ~6 min on the 2-core machine; the Ray tests above cover that path)."""
    from model.inference import load_model

    bucket, client = s3_bucket
    src, dst = f"s3://{bucket}/in", f"s3://{bucket}/out"
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=bucket, Key=f"in/{i // 100}/{i:04d}.png", Body=png(i, 8)),
                range(1000),
            )
        )
    inputs = storage.list_inputs(src)
    assert len(inputs) == 1000
    rows = [{"key": f.key, "size_bytes": f.size, "source_version": f.version, "status": OK,
             "output": storage.join(dst, f.key), "run_id": "seed"} for f in inputs]  # fmt: skip
    seed_run = "20261121T000000Z-seed00"
    nightly.commit(dst, nightly.load_state(dst), seed_run, rows, keep={f.key for f in inputs},
                   model_version=load_model(tiny_checkpoint).version)  # fmt: skip

    started = time.perf_counter()
    night = subprocess.run(
        [sys.executable, "-c", NIGHT_WITHOUT_RAY, src, dst, "--checkpoint", tiny_checkpoint],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=no_ray_address(),
        check=False,
    )
    seconds = time.perf_counter() - started

    with capsys.disabled():
        print(f"\n1,000 unchanged inputs on the local S3 endpoint: nightly run took {seconds:.1f} s end to end")
    assert night.returncode == EXIT_OK, night.stderr
    assert "ray started: False" in night.stdout
    assert "nightly: new 0, changed 0, model changed 0, output changed 0, retried 0, unchanged 1000," in night.stdout
    assert seconds < 30.0, f"a night with nothing to do took {seconds:.1f} s (limit 30 s)"
    run_key = run_dir_of(night.stdout).removeprefix(f"s3://{bucket}/")
    manifest = pq.read_table(
        io.BytesIO(client.get_object(Bucket=bucket, Key=f"{run_key}/manifest.parquet")["Body"].read())
    )
    assert manifest.num_rows == 1000 and set(manifest.column("status").to_pylist()) == {"skipped"}


# ----------------------------------------------------------------------------- schedule templates

# KubeRay v1 field names, from the CRDs of KubeRay 1.6 (ray-operator/config/crd/bases/ray.io_rayjobs.yaml,
# ray.io_raycronjobs.yaml) and ray-operator/apis/ray/v1/raycluster_types.go.
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
RAYCRONJOB_SPEC_KEYS = {"schedule", "jobTemplate", "suspend"}  # required: schedule, jobTemplate
RAYCLUSTER_SPEC_KEYS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_KEYS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_KEYS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}


def check_rayjob_spec(spec: dict, where: str) -> None:
    assert set(spec) <= RAYJOB_SPEC_KEYS, f"{where}: not RayJob fields: {set(spec) - RAYJOB_SPEC_KEYS}"
    assert re.search(r"(python jobs/nightly\.py|isosr nightly) \S+ \S+", spec["entrypoint"]), spec["entrypoint"]
    assert "--address auto" in spec["entrypoint"], "a Ray job's driver must join the cluster, not start its own Ray"
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML document in a string
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_KEYS, f"{where}: {set(cluster) - RAYCLUSTER_SPEC_KEYS}"
    assert cluster["enableInTreeAutoscaling"] is True
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_KEYS and "template" in cluster["headGroupSpec"]
    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_KEYS, f"{where}: {set(group) - WORKER_GROUP_KEYS}"
        assert {"groupName", "minReplicas", "maxReplicas", "template", "rayStartParams"} <= set(group)
        assert group["minReplicas"] == 0 <= group.get("replicas", 0) <= group["maxReplicas"], "GPU workers scale from 0"
        containers = group["template"]["spec"]["containers"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers):
            gpu_groups.append(group)
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"


def test_the_kuberay_manifests_use_kuberay_v1_fields_and_run_the_nightly_job() -> None:
    [job] = yaml.safe_load_all((REPO / "jobs/k8s/rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_rayjob_spec(job["spec"], "jobs/k8s/rayjob.yaml")

    [cron] = yaml.safe_load_all((REPO / "jobs/k8s/raycronjob.yaml").read_text())
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert set(cron["spec"]) <= RAYCRONJOB_SPEC_KEYS and {"schedule", "jobTemplate"} <= set(cron["spec"])
    assert len(cron["spec"]["schedule"].split()) == 5
    check_rayjob_spec(cron["spec"]["jobTemplate"], "jobs/k8s/raycronjob.yaml")
    assert cron["spec"]["jobTemplate"] == job["spec"], "the RayJob a RayCronJob creates is jobs/k8s/rayjob.yaml's"


def test_the_cron_and_systemd_templates_run_isosr_nightly_without_a_lockfile() -> None:
    schedule = REPO / "jobs" / "schedule"
    cron = (schedule / "isosr-nightly.cron").read_text().splitlines()
    [line] = [ln for ln in cron if ln.strip() and not ln.startswith("#") and "=" not in ln.split()[0]]
    minute, hour, day, month, weekday, user, command = line.split(None, 6)  # an /etc/cron.d line names its user
    assert minute.isdigit() and hour.isdigit() and (day, month, weekday) == ("*", "*", "*"), line
    assert user != "root" and re.search(r"\S*isosr nightly \S+ \S+", command) and "flock" not in command, line

    service = (schedule / "isosr-nightly.service").read_text()
    timer = (schedule / "isosr-nightly.timer").read_text()
    assert re.search(r"^ExecStart=\S*isosr nightly \S+ \S+", service, re.MULTILINE)
    assert re.search(r"^Type=oneshot$", service, re.MULTILINE) and "flock" not in service
    assert re.search(r"^StandardOutput=journal$", service, re.MULTILINE)
    assert re.search(r"^SuccessExitStatus=.*\b4\b", service, re.MULTILINE)  # another run holds the lease: not a failure
    assert re.search(r"^OnCalendar=\S", timer, re.MULTILINE) and re.search(r"^Persistent=true$", timer, re.MULTILINE)
    assert re.search(r"^Unit=isosr-nightly\.service$", timer, re.MULTILINE)
