"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


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


@pytest.fixture(scope="session")
def s3_env(s3_endpoint: str) -> Iterator[str]:
    """AWS variables pointing at the local S3 endpoint for the whole session, set before Ray starts
    (`ray_local`) so that Ray's worker processes inherit them. Yields the endpoint URL."""
    import os

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
