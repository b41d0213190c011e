"""Fault injection: each fault is checked against a fault-free run of the same inputs. Every input
has exactly one manifest row with the same outcome, outputs are byte-identical (CPU inference is
deterministic), and nothing is written outside DST.

So far: storage faults (500, 503 SlowDown and ServiceUnavailable, dropped connections) from
tests/fault_proxy.py in front of the local S3 endpoint. Run alone: pytest -m faults
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from tests.fault_proxy import FAULTS, FaultProxy

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.faults, pytest.mark.slow]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def run_job(endpoint: str, src: str, dst: str, checkpoint: str) -> subprocess.CompletedProcess[bytes]:
    """`python jobs/upscale.py SRC DST` in a subprocess with its own local Ray, reaching S3 at `endpoint`."""
    ray_dir = Path(tempfile.mkdtemp(prefix="isr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=endpoint, RAY_TMPDIR=str(ray_dir))  # fmt: skip
    try:
        return subprocess.run(
            [sys.executable, "jobs/upscale.py", src, dst, "--checkpoint", checkpoint, "--spot-check-rate", "0.5"],
            cwd=REPO, env=env, capture_output=True, timeout=400, check=False,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def final_state(client: object, bucket: str, prefix: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """(outputs by key, manifest status by input key) of the run under s3://bucket/prefix/."""
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
            for o in page.get("Contents", [])]  # fmt: skip
    outputs = {k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read()
               for k in keys if "/_isosr/" not in f"/{k}"}  # fmt: skip
    manifests = [k for k in keys if k.endswith("/manifest.parquet")]
    assert len(manifests) == 1, manifests
    table = pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=manifests[0])["Body"].read()))
    rows = table.select(["key", "status"]).to_pylist()
    statuses = {r["key"]: r["status"] for r in rows}
    assert len(statuses) == len(rows), "an input has more than one manifest row"
    return outputs, statuses


def test_storage_faults_are_retried_and_the_run_ends_as_a_fault_free_one(
    s3_bucket: tuple[str, object], s3_endpoint: str, tiny_checkpoint: str
) -> None:
    bucket, client = s3_bucket
    photo = skimage.data.astronaut()
    inputs = {f"in/p{i}.png": png(photo[40 * i : 40 * i + 70, 30 * i : 30 * i + 90]) for i in range(6)}
    inputs["in/broken.png"] = b"\x89PNG\r\n\x1a\n truncated"
    for key, data in inputs.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)

    clean = run_job(s3_endpoint, f"s3://{bucket}/in", f"s3://{bucket}/clean", tiny_checkpoint)
    assert clean.returncode == 3, clean.stderr.decode(errors="replace")[-2000:]  # broken.png fails, as planted
    with FaultProxy(s3_endpoint, share=0.15, seed=7) as proxy:
        faulty = run_job(proxy.url, f"s3://{bucket}/in", f"s3://{bucket}/faulty", tiny_checkpoint)
    print(f"faults injected: {dict(proxy.injected)}; requests forwarded: {proxy.forwarded}")
    assert faulty.returncode == 3, faulty.stderr.decode(errors="replace")[-2000:]
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
