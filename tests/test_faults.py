"""Fault injection: each fault is checked against a fault-free run of the same inputs. Every input
has exactly one manifest row with the same outcome, outputs are byte-identical (CPU inference is
deterministic), and nothing is written outside DST.

Faults, each injected into `python jobs/upscale.py` running in a subprocess (unless said otherwise):
- storage: 500 InternalError, 503 SlowDown and ServiceUnavailable, and dropped connections, on a share
  of the S3 requests (tests/fault_proxy.py in front of the local S3 endpoint): retried, the run ends
  as a fault-free one; on every request (`isosr upscale` in-process): exit 5 and one line once the
  retries are spent;
- a model actor (TileWorker) SIGKILLed while it works on a piece: Ray restarts it and retries the piece;
- a worker node of a two-node cluster (ray.cluster_utils.Cluster) killed while a model actor on it
  works: the actor, its piece and the node's other tasks and objects are redone on the head;
- the driver SIGKILLed halfway, with the local Ray it started: a rerun (--skip-existing, the default)
  skips what the killed run wrote and does exactly the rest.

Run alone: pytest -m faults
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from pipeline.cli import EXIT_SOME_FAILED
from tests.fault_proxy import FAULTS, FaultProxy
from tests.sessions import assert_session_gone, kill_session, processes

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.faults, pytest.mark.slow]

T = TypeVar("T")
PHOTOS = [f"p{i:02d}.png" for i in range(16)]  # enough that a fault lands with work done and work left
OPTIONS = ("--spot-check-rate", "0")  # one spot check: the faults are about the outputs and rows
# Ray's title of a model actor's process, and of one at work on a piece (Ray Data's _MapWorker.submit).
TILE_WORKER = "ray::MapWorker(MapBatches(TileWorker))"
TILE_WORKER_BUSY = f"{TILE_WORKER}.submit"
TEMPORARY = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")  # storage.write_atomic's hidden local temporaries


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Job:
    """`python jobs/upscale.py SRC DST --checkpoint CKPT [options]` in a subprocess, in a session of its
    own, so that it and every process of the Ray it starts can be found and killed together. It starts
    its own local Ray (RAY_ADDRESS and AWS_* are left out of its environment, RAY_TMPDIR is a fresh
    folder) unless --address says otherwise; `env` adds variables. Leaving the `with` block ends
    whatever is left of it."""

    def __init__(self, src: str, dst: str, checkpoint: str, *options: str, env: dict[str, str] | None = None) -> None:
        self.command = [sys.executable, "jobs/upscale.py", src, dst, "--checkpoint", checkpoint, *options]
        self.env = env or {}

    def __enter__(self) -> Self:
        self.ray_dir = tempfile.mkdtemp(prefix="isr", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.log = tempfile.TemporaryFile()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=env | {"RAY_TMPDIR": self.ray_dir} | self.env,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        kill_session(self.process.pid)
        self.process.wait()
        shutil.rmtree(self.ray_dir, ignore_errors=True)
        self.log.close()

    def wait(self, timeout: float = 400) -> int:
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def processes(self) -> dict[int, str]:
        """Title by pid of the job's processes: the driver and those of the Ray it started."""
        return {pid: title for pid, sid, _, title in processes() if sid == self.process.pid}

    def wait_for(self, condition: Callable[[], T], what: str, timeout: float = 300) -> T:
        """Poll until `condition` returns something true, and return that; fail if the job ends first."""
        deadline = time.monotonic() + timeout
        while not (found := condition()):
            assert self.process.poll() is None, f"the job ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.02)
        return found


def run_job(src: str, dst: str, checkpoint: str, *options: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a Job to its end: (exit status, its output)."""
    with Job(src, dst, checkpoint, *options, env=env) as job:
        return job.wait(), job.output()


def statuses(manifest: pa.Table) -> dict[str, str]:
    """Status by input key; fails if an input has more than one row."""
    rows = manifest.select(["key", "status"]).to_pylist()
    by_key = {r["key"]: r["status"] for r in rows}
    assert len(by_key) == len(rows), "an input has more than one manifest row"
    return by_key


# ----------------------------------------------------------------------------- storage faults (S3)


def aws(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}  # fmt: skip


def final_state(client: object, bucket: str, prefix: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """(outputs by key, manifest status by input key) of the run under s3://bucket/prefix/."""
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
            for o in page.get("Contents", [])]  # fmt: skip
    outputs = {k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read()
               for k in keys if "/_isosr/" not in f"/{k}"}  # fmt: skip
    manifests = [k for k in keys if k.endswith("/manifest.parquet")]
    assert len(manifests) == 1, manifests
    manifest = pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=manifests[0])["Body"].read()))
    return outputs, statuses(manifest)


def test_storage_faults_are_retried_and_the_run_ends_as_a_fault_free_one(
    s3_bucket: tuple[str, object], s3_endpoint: str, tiny_checkpoint: str
) -> None:
    bucket, client = s3_bucket
    photo = skimage.data.astronaut()
    inputs = {f"in/p{i}.png": png(photo[40 * i : 40 * i + 70, 30 * i : 30 * i + 90]) for i in range(6)}
    inputs["in/broken.png"] = b"\x89PNG\r\n\x1a\n truncated"
    for key, data in inputs.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    src, options = f"s3://{bucket}/in", ("--spot-check-rate", "0.5")

    status, log = run_job(src, f"s3://{bucket}/clean", tiny_checkpoint, *options, env=aws(s3_endpoint))
    assert status == EXIT_SOME_FAILED, log[-2000:]  # broken.png fails, as planted
    with FaultProxy(s3_endpoint, share=0.15, seed=7) as proxy:
        status, log = run_job(src, f"s3://{bucket}/faulty", tiny_checkpoint, *options, env=aws(proxy.url))
    print(f"faults injected: {dict(proxy.injected)}; requests forwarded: {proxy.forwarded}")
    assert status == EXIT_SOME_FAILED, log[-2000:]
    assert sum(proxy.injected.values()) >= 10 and len(proxy.injected) == len(FAULTS), proxy.injected

    clean_outputs, clean_rows = final_state(client, bucket, "clean")
    faulty_outputs, faulty_rows = final_state(client, bucket, "faulty")
    assert faulty_rows == clean_rows  # one row per input, the same outcome: none lost, none duplicated
    assert sorted(clean_rows) == sorted(k[len("in/") :] for k in inputs)
    assert clean_rows["broken.png"] == "failed" and list(clean_rows.values()).count("ok") == 6
    assert faulty_outputs.keys() == clean_outputs.keys()
    assert all(faulty_outputs[k] == clean_outputs[k] for k in clean_outputs), "an output differs byte for byte"
    everything = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert all(k.split("/")[0] in ("in", "clean", "faulty") for k in everything), "written outside DST"


def test_a_store_that_keeps_failing_ends_the_job_with_exit_5_and_one_line(
    s3_bucket: tuple[str, object], s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every request fails and retries are spent: a readable error and exit 5, not a traceback."""
    import s3fs

    from pipeline.cli import EXIT_STORAGE, main

    bucket, client = s3_bucket
    client.put_object(Bucket=bucket, Key="in/a.png", Body=png(skimage.data.astronaut()[:64, :64]))
    with FaultProxy(s3_endpoint, share=1.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own variable: two attempts, not ten
        s3fs.S3FileSystem.clear_instance_cache()
        status = main(["upscale", f"s3://{bucket}/in", f"s3://{bucket}/out"])
    s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err
    assert status == EXIT_STORAGE, err
    assert err.startswith("isosr: storage error: ") and "Traceback" not in err, err
    assert sum(proxy.injected.values()) >= 2  # retried before giving up
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="out/")  # nothing written


# ----------------------------------------------------------------------------- process and node faults (local files)


@dataclass(frozen=True)
class Reference:
    """Inputs in a local SRC and what a fault-free run makes of them."""

    src: Path
    outputs: dict[str, bytes]  # by path under DST
    statuses: dict[str, str]  # by input key


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str) -> Reference:
    """Sixteen 110×90 photos and a broken PNG, upscaled without a fault."""
    root = tmp_path_factory.mktemp("reference")
    src = root / "src"
    src.mkdir()
    photo = skimage.data.astronaut()
    for i, name in enumerate(PHOTOS):
        (src / name).write_bytes(png(photo[20 * i : 20 * i + 90, 25 * i : 25 * i + 110]))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    status, log = run_job(str(src), str(root / "clean"), tiny_checkpoint, *OPTIONS)
    assert status == EXIT_SOME_FAILED, log[-3000:]  # broken.png fails, as planted
    outputs, rows, temporaries = local_state(root / "clean")
    assert rows == {**dict.fromkeys(PHOTOS, "ok"), "broken.png": "failed"} and not temporaries
    assert sorted(outputs) == PHOTOS
    for data in outputs.values():
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (4 * 110, 4 * 90)
    return Reference(src, outputs, rows)


def local_state(dst: Path) -> tuple[dict[str, bytes], dict[str, str], list[str]]:
    """(outputs by path under DST, manifest status by input key, write_atomic temporaries left in DST)
    of the one run under DST that wrote its manifest."""
    outputs, temporaries = {}, []
    for path in sorted(p for p in dst.rglob("*") if p.is_file()):
        name = path.relative_to(dst).as_posix()
        if name.startswith("_isosr/"):
            continue
        if TEMPORARY.match(path.name):
            temporaries.append(name)
        else:
            outputs[name] = path.read_bytes()
    manifests = list(dst.glob("_isosr/runs/*/manifest.parquet"))
    assert len(manifests) == 1, manifests
    return outputs, statuses(pq.read_table(manifests[0])), temporaries


def written(dst: Path) -> list[Path]:
    """Outputs in DST so far (write_atomic renames each into place whole)."""
    return list(dst.glob("*.png"))


def assert_ends_as_reference(dst: Path, reference: Reference, expected: dict[str, str] | None = None) -> list[str]:
    """The run in DST has exactly one row per input with the reference's status (or `expected`), the
    reference's outputs byte for byte, and wrote nothing beside DST or into SRC. Returns the
    write_atomic temporaries left in DST (by writes that were killed)."""
    outputs, rows, temporaries = local_state(dst)
    expected = expected or reference.statuses
    lost, extra = sorted(expected.keys() - rows.keys()), sorted(rows.keys() - expected.keys())
    changed = {k: (rows[k], expected[k]) for k in rows.keys() & expected.keys() if rows[k] != expected[k]}
    assert not (lost or extra or changed), (
        f"inputs without a row {lost}, rows of no input {extra}, (got, expected) {changed}"
    )
    assert outputs.keys() == reference.outputs.keys()
    differ = [k for k in outputs if outputs[k] != reference.outputs[k]]
    assert not differ, f"outputs differ byte for byte from the fault-free run's: {differ}"
    assert [p.name for p in dst.parent.iterdir()] == [dst.name], "written beside DST"
    assert sorted(p.name for p in reference.src.iterdir()) == sorted([*PHOTOS, "broken.png"]), "written into SRC"
    return temporaries


def test_a_model_actor_killed_mid_run_is_restarted_and_the_run_ends_as_a_fault_free_one(
    reference: Reference, tiny_checkpoint: str, tmp_path: Path
) -> None:
    """One TileWorker process is SIGKILLed (as the OOM killer does) while it works on a piece. Ray Data
    gives its actors max_restarts=-1 and max_task_retries=-1: the actor is restarted, the piece retried."""
    dst = tmp_path / "dst"
    with Job(str(reference.src), str(dst), tiny_checkpoint, *OPTIONS) as job:

        def busy_actor() -> int | None:
            if not written(dst):
                return None
            return next((pid for pid, title in job.processes().items() if title == TILE_WORKER_BUSY), None)

        pid = job.wait_for(busy_actor, "a model actor at work once the first output was written")
        os.kill(pid, signal.SIGKILL)
        done_at_kill = len(written(dst))
        status = job.wait()
        log = job.output()
    print(f"killed model actor pid {pid} with {done_at_kill} of {len(PHOTOS)} outputs written")
    assert 1 <= done_at_kill < len(PHOTOS), "the actor was not killed mid-run"
    assert status == EXIT_SOME_FAILED, log[-3000:]
    temporaries = assert_ends_as_reference(dst, reference)
    assert not temporaries, temporaries  # only the actor died: no write was cut short


CLUSTER = """
import sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
worker = cluster.add_node(num_cpus=2)
print("cluster", cluster.address, worker.all_processes["raylet"][0].process.pid, flush=True)
sys.stdin.readline()
cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: the node is lost, not drained
print("removed", flush=True)
sys.stdin.readline()
"""


def test_a_worker_node_lost_mid_run_has_its_work_redone_and_the_run_ends_as_a_fault_free_one(
    reference: Reference, tiny_checkpoint: str, tmp_path: Path
) -> None:
    """A cluster of a head and a worker node (2 CPUs each, in a process of their own, on this machine)
    runs the job; every process of the worker node is SIGKILLed while a model actor on it works on a
    piece. Its actor is restarted on the head, its lost tasks and objects are redone there."""
    dst = tmp_path / "dst"
    ray_dir = tempfile.mkdtemp(prefix="isc", dir="/tmp")  # its own: ray.init() elsewhere must not find it
    # A driver given an address sends no token unless RAY_AUTH_MODE says so: no auth on this machine.
    auth = {"RAY_AUTH_MODE": "disabled"}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | auth | {"RAY_TMPDIR": ray_dir}
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        line = cluster.stdout.readline()
        assert line.startswith("cluster "), f"the cluster did not start: {line!r}"
        _, address, raylet = line.split()
        # Two model actors, one per node (Ray Data spreads them), both up before the first piece is handed
        # out, so that the worker node's actor has work. The default, one per CPU, would fill the head
        # once the lost actors were restarted there, leaving no CPU for decoding and encoding.
        options = (*OPTIONS, "--address", address, "--max-workers", "2")
        both_up = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}
        with Job(str(reference.src), str(dst), tiny_checkpoint, *options, env=auth | both_up) as job:

            def on_the_worker() -> list[str]:
                titles = [title for _, _, ppid, title in processes() if ppid == int(raylet)] if written(dst) else []
                return titles if TILE_WORKER_BUSY in titles else []

            lost = job.wait_for(on_the_worker, "a model actor at work on the worker node once an output was written")
            cluster.stdin.write("remove\n")
            cluster.stdin.flush()
            assert cluster.stdout.readline() == "removed\n"
            done_at_loss = len(written(dst))
            status = job.wait()
            log = job.output()
    finally:
        kill_session(cluster.pid)
        cluster.wait()
        assert_session_gone(cluster.pid)
        shutil.rmtree(ray_dir, ignore_errors=True)
    print(f"worker node lost with {done_at_loss} of {len(PHOTOS)} outputs written; its Ray processes: {lost}")
    assert 1 <= done_at_loss < len(PHOTOS), "the node was not lost mid-run"
    assert status == EXIT_SOME_FAILED, log[-3000:]
    temporaries = assert_ends_as_reference(dst, reference)
    print(f"temporaries left by writes on the lost node: {temporaries}")


def test_a_driver_killed_halfway_is_completed_by_a_rerun_that_does_exactly_the_remainder(
    reference: Reference, tiny_checkpoint: str, tmp_path: Path
) -> None:
    """The driver and the local Ray it started are SIGKILLed (every process of its session at once, as
    a machine loss does) once half the outputs are written. The same command again skips exactly the
    outputs that exist, never rewrites them, and does the rest: with both runs, every input once."""
    dst = tmp_path / "dst"
    with Job(str(reference.src), str(dst), tiny_checkpoint, *OPTIONS) as killed:
        killed.wait_for(lambda: len(written(dst)) >= len(PHOTOS) // 2, "half the outputs")
        kill_session(killed.process.pid)
        killed.wait(timeout=60)
        assert_session_gone(killed.process.pid)  # from here on nothing of the killed job can write
    existed = {p.name: p.stat().st_mtime_ns for p in written(dst)}
    print(f"driver killed with {len(existed)} of {len(PHOTOS)} outputs written")
    assert len(PHOTOS) // 2 <= len(existed) < len(PHOTOS), "the driver was not killed halfway"
    [killed_run] = (dst / "_isosr" / "runs").iterdir()
    assert not (killed_run / "manifest.parquet").exists()
    recorded = [r for part in killed_run.glob("parts/*.parquet") for r in pq.read_table(part).to_pylist()]
    assert {r["key"] for r in recorded if r["status"] == "ok"} <= existed.keys()  # recorded once written, not before

    status, log = run_job(str(reference.src), str(dst), tiny_checkpoint, *OPTIONS)
    assert status == EXIT_SOME_FAILED, log[-3000:]
    expected = {key: "skipped" if key in existed else outcome for key, outcome in reference.statuses.items()}
    temporaries = assert_ends_as_reference(dst, reference, expected)
    assert all(existed[k] == (dst / k).stat().st_mtime_ns for k in existed), "an output of the killed run was rewritten"
    print(
        f"rerun: {len(existed)} skipped, the other {len(expected) - len(existed)} processed; temporaries: {temporaries}"
    )
