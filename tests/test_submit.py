"""`isosr submit` against a real Ray head started with `ray start --head` (job server included):
the job runs jobs/upscale.py from the uploaded project folder, its outputs are checked, and a second
identical submission does not run the job again."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from pipeline.cli import main
from pipeline.submit import PROJECT_ROOT, SubmitError, cluster_path, submission_id

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _token_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    """A default `ray start` head requires Ray's token authentication; the job client sends the
    token (~/.ray/auth_token, shared with the head on this machine) only in token mode."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head with its dashboard's job server on a free port, in its own session (so that it
    and every process it starts can be killed without touching other Ray instances on the machine)
    and its own temp dir (so that `ray.init()` elsewhere does not find and join it)."""
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = _free_port()
    ray = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [
            str(ray), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
            # Other Ray instances on this machine hold the default agent ports (52365, ...).
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        # The head's `python` is this environment's, as on a cluster set up by cluster.yaml.
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PATH": f"{ray.parent}:{os.environ['PATH']}"},
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start failed:\n{head.communicate()[0][-3000:]}"
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code in (200, 401):
                    break  # up (401: Ray's token authentication, which the job client handles)
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the job server did not come up within 120 s"
            time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_submitted_job_upscales_and_a_resubmission_does_not_run_twice(
    ray_head: str, tiny_checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(src / f"p{i}.png")
    checkpoint = PROJECT_ROOT / "tmp-test-tiny.safetensors"  # inside the project: uploaded with it
    shutil.copy(tiny_checkpoint, checkpoint)
    try:
        args = ["submit", str(src), str(dst), "--address", ray_head, "--checkpoint", str(checkpoint), "--wait"]
        assert main(args) == 0
        first = capsys.readouterr().out
        assert "submitted job isosr-upscale-" in first
        assert "inputs 3, ok 3, failed 0" in first, first[-2000:]  # the job's own summary, streamed
        for i in range(3):
            with Image.open(dst / f"p{i}.png") as img:
                assert img.size == (200, 4 * (40 + i))
        manifests = sorted(dst.glob("_isosr/runs/*/manifest.parquet"))
        assert len(manifests) == 1 and pq.read_table(manifests[0]).column("status").to_pylist() == ["ok"] * 3

        # The same submission again: found, followed, not rerun.
        assert main(args) == 0
        second = capsys.readouterr().out
        assert "was already submitted; not starting it again" in second
        assert len(sorted(dst.glob("_isosr/runs/*/manifest.parquet"))) == 1

        # An explicit new id runs it again (every output exists: all skipped), exit status passed on.
        assert main([*args, "--submission-id", "isosr-test-rerun"]) == 0
        assert "submitted job isosr-test-rerun" in capsys.readouterr().out
        assert len(sorted(dst.glob("_isosr/runs/*/manifest.parquet"))) == 2
    finally:
        checkpoint.unlink()


def test_a_failing_job_returns_its_exit_status(ray_head: str, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    status = main(["submit", str(tmp_path / "in"), str(tmp_path / "out"), "--address", ray_head, "--wait"])
    assert status == 3  # isosr upscale's "some inputs failed", passed through from the cluster


def test_submission_ids_are_stable_and_local_checkpoints_must_be_visible(tmp_path: Path) -> None:
    a = submission_id("s3://b/in", "s3://b/out", ["--halo", "4"])
    assert a == submission_id("s3://b/in", "s3://b/out", ["--halo", "4"])
    assert a != submission_id("s3://b/in", "s3://b/out", ["--halo", "8"])
    assert cluster_path("s3://b/m.safetensors") == "s3://b/m.safetensors"
    assert cluster_path(str(PROJECT_ROOT / "model" / "x.safetensors")) == "model/x.safetensors"
    with pytest.raises(SubmitError, match="outside .* cannot read it"):
        cluster_path(str(tmp_path / "m.safetensors"))


def test_an_unreachable_job_server_is_a_clear_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["submit", str(tmp_path), str(tmp_path / "o"), "--address", f"http://127.0.0.1:{_free_port()}"])
    assert status == 2
    assert "cannot reach the Ray job server" in capsys.readouterr().err
