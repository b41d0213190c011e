"""`isosr submit`: hand an upscale job to a Ray cluster through its job server.

The job runs `python jobs/upscale.py SRC DST [options]` on the cluster with this project folder as
the job's `working_dir` (Ray uploads it, minus the virtual environment, git data, tests and build
output), so the cluster runs exactly the code that submitted it; the cluster's Python must already
have the project's dependencies (cluster.yaml's setup commands install them).

The submission id is derived from SRC, DST and the options, so submitting the same job twice (a
retried cron line, a double click) runs it once: the second submission finds the first and, with
`--wait`, follows it instead. Pass `--submission-id` to run the same job again on purpose.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiohttp

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv", ".git", "tests", "isosr-demo", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60  # how long a just-started head may take to bring up its job agent


class SubmitError(RuntimeError):
    """The job server could not be reached or refused the job; the message says what to do."""


@dataclass(frozen=True)
class Submission:
    submission_id: str
    entrypoint: str
    existed: bool  # a job with this id was already there: nothing new was started


def submission_id(src: str, dst: str, upscale_args: list[str]) -> str:
    """The same job always gets the same id: 'isosr-upscale-' + 16 hex digits of a digest."""
    digest = hashlib.sha256(json.dumps([src, dst, upscale_args]).encode()).hexdigest()[:16]
    return f"isosr-upscale-{digest}"


def entrypoint(src: str, dst: str, upscale_args: list[str]) -> str:
    return shlex.join(["python", "jobs/upscale.py", src, dst, *upscale_args])


def cluster_path(checkpoint: str | None) -> str | None:
    """A checkpoint the cluster can read: URIs as they are; a local file inside the project as its
    path in the uploaded working_dir. Raises SubmitError for a local file outside the project,
    which the cluster cannot see."""
    if checkpoint is None or "://" in checkpoint:
        return checkpoint
    path = Path(checkpoint).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        raise SubmitError(
            f"checkpoint {checkpoint} is a local file outside {PROJECT_ROOT}, so the cluster cannot read it; "
            "upload it to object storage (s3://...) and pass that URI, or copy it into the project folder"
        ) from None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:  # unreachable, or not a job server
        raise SubmitError(
            f"cannot reach the Ray job server at {address} ({e}); check that the head node is up and that its "
            "dashboard port (8265 by default) is reachable, e.g. through `ray dashboard cluster.yaml`"
        ) from None


def submit(
    address: str,
    src: str,
    dst: str,
    upscale_args: list[str],
    *,
    sub_id: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> tuple[object, Submission]:
    """Submit (or find) the job; returns the client and what happened."""
    client = _client(address)
    sub_id = sub_id or submission_id(src, dst, upscale_args)
    command = entrypoint(src, dst, upscale_args)
    if _status(client, sub_id) is not None:
        return client, Submission(sub_id, command, existed=True)
    runtime_env: dict[str, object] = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=command,
                submission_id=sub_id,
                runtime_env=runtime_env,
                metadata={"tool": "isosr", "src": src, "dst": dst},
            )
            return client, Submission(sub_id, command, existed=False)
        except RuntimeError as e:
            if _status(client, sub_id) is not None:  # submitted by a concurrent twin in the meantime
                return client, Submission(sub_id, command, existed=True)
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)  # a head that has just started: its job agent is not up yet
                continue
            raise SubmitError(f"the job server at {address} refused the job: {e}") from None


def _status(client, sub_id: str) -> str | None:
    try:
        return str(client.get_job_status(sub_id).value)
    except RuntimeError:  # Ray: "Job ... does not exist"
        return None


def follow(client, sub_id: str, *, out: TextIO | None = None, poll_s: float = 1.0) -> int:
    """Print the job's logs as they come until it ends; return its exit status: the driver's exit
    code when Ray knows it (0 all done, 3 some inputs failed, 2 usage error), else 0 for SUCCEEDED
    and 1 for FAILED or STOPPED."""

    out = out or sys.stdout
    printed: list[str] = []

    async def tail() -> None:
        async for lines in client.tail_job_logs(sub_id):
            out.write(lines)
            out.flush()
            printed.append(lines)

    try:
        asyncio.run(tail())
    except (aiohttp.ClientError, OSError, RuntimeError, TimeoutError) as e:  # the stream can drop: poll
        print(f"isosr: log stream ended early ({e}); waiting for the job to finish", file=sys.stderr)
    while (status := _status(client, sub_id)) not in TERMINAL:
        time.sleep(poll_s)
    # The stream can close before the driver's last lines reach it: print the rest from the full log.
    logs, seen = client.get_job_logs(sub_id), "".join(printed)
    if logs.startswith(seen) and len(logs) > len(seen):
        out.write(logs[len(seen) :])
        out.flush()
    info = client.get_job_info(sub_id)
    code = getattr(info, "driver_exit_code", None)
    if code is None:
        code = 0 if status == "SUCCEEDED" else 1
    if status != "SUCCEEDED":
        print(f"isosr: job {sub_id} {status.lower()}: {info.message or ''}".rstrip(), file=sys.stderr)
    return int(code)


def forwarded_env(names: list[str]) -> dict[str, str]:
    """The named variables of this environment, for the job. Raises SubmitError for unset ones."""
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise SubmitError(f"--env {', '.join(missing)}: not set in this environment")
    return {n: os.environ[n] for n in names}
