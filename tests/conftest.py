"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; playwright never downloads a browser here
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


ALONE_REASON = (
    "autoscaling tests end every Ray process on this machine (`ray stop --force`), so they run only in a "
    "pytest process that runs nothing else: `pytest -m autoscaling` (make test runs it after the other tests)"
)


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what it deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the autoscaling tests, with the reason, wherever they would share a process with others."""
    autoscaling = [item for item in items if item.get_closest_marker("autoscaling")]
    if autoscaling and len(autoscaling) < len(items):
        for item in autoscaling:
            item.add_marker(pytest.mark.skip(reason=ALONE_REASON))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny variant saved as a checkpoint, with a random last layer so that its output differs
    from plain bilinear."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import variant
    from model.network import DenseIsoViT

    torch.manual_seed(0)
    model = DenseIsoViT(variant("tiny"))
    torch.nn.init.normal_(model.to_rgb.weight, std=0.02)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model, path)
    return str(path)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium through playwright. Skipped where chromium or playwright is missing,
    except in CI (CI=true), where that is a failure: CI must run the browser tests."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed"
    if reason is None and not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3 API (moto's threaded server on 127.0.0.1, a free port), e.g. "http://127.0.0.1:40123".

    Sets nothing global: tests point their clients at it themselves, e.g. with monkeypatch.setenv
    for AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION.
    Buckets persist for the session: use unique bucket names.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, object]]:
    """(bucket, boto3 client): a fresh bucket on the local S3 endpoint. The code under test reaches it
    through the standard AWS environment alone (set here with monkeypatch), while the client is given
    the endpoint explicitly, so agreement between them proves the environment works."""
    import uuid

    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    # s3fs caches filesystem instances by constructor arguments, not by environment.
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"isosr-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield bucket, client
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_env(s3_endpoint: str) -> Iterator[str]:
    """AWS variables pointing at the local S3 endpoint for the whole session, set before Ray starts
    (`ray_local`) so that Ray's worker processes inherit them. Yields the endpoint URL."""
    import s3fs

    values = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield s3_endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_local(s3_env: str) -> Iterator[None]:
    """A local Ray for the session: 2 CPUs and 1 logical GPU (the model code falls back to the CPU
    when CUDA is absent), as DESIGN.md describes. isosr's run() reuses it instead of starting its own."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()
