"""Secrets: credentials planted in the environment never reach a log, a manifest, a report or an
output, even when an input fails and errors are written. (Checkpoint pinning: tests/test_cli.py;
keys with `..` staying inside DST: tests/test_pipeline.py.)"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.cluster
def test_planted_credentials_appear_in_no_log_manifest_report_or_output(
    s3_bucket: tuple[str, object], s3_endpoint: str, tiny_checkpoint: str
) -> None:
    bucket, client = s3_bucket
    photo = skimage.data.astronaut()
    inputs = {
        "in/a.png": png(photo[100:160, 200:270]),
        "in/with space/b.png": png(photo[300:350, 100:180]),
        "in/broken.png": b"\x89PNG\r\n\x1a\n not really",  # a failed row: its error is written everywhere
    }
    for key, data in inputs.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    # moto takes any credentials: these are what a user's real ones would be, and must never leak.
    key_id = "AKIA" + secrets.token_hex(8).upper()
    secret = "planted/" + secrets.token_urlsafe(30)
    ray_dir = Path(tempfile.mkdtemp(prefix="isr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(
        AWS_ACCESS_KEY_ID=key_id,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=s3_endpoint,
        RAY_TMPDIR=str(ray_dir),
    )
    try:
        job = subprocess.run(
            [sys.executable, "jobs/upscale.py", f"s3://{bucket}/in", f"s3://{bucket}/out",
             "--checkpoint", tiny_checkpoint, "--spot-check-rate", "1"],
            cwd=REPO, env=env, capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        assert job.returncode == 3, job.stderr.decode(errors="replace")[-3000:]  # one input failed, as planted

        scanned: dict[str, bytes] = {"stdout": job.stdout, "stderr": job.stderr}
        listing = client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
        for item in listing:
            scanned[f"s3://{bucket}/{item['Key']}"] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for path in ray_dir.rglob("*"):
            if path.is_file() and not path.is_symlink() and "sockets" not in path.parts:
                scanned[str(path)] = path.read_bytes()

        assert any(name.endswith("manifest.parquet") for name in scanned)
        assert any(name.endswith("report.html") for name in scanned)
        assert sum("/logs/" in name for name in scanned) > 5, "Ray's logs were not found, so not scanned"
        assert b"FAILED broken.png" in job.stdout  # the failure is reported, with its key...
        for planted in (secret, key_id):
            leaks = [name for name, data in scanned.items() if planted.encode() in data]
            assert leaks == [], f"credential found in {leaks}"  # ...and no credential anywhere
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
