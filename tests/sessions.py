"""Killing a job as a machine loss does: every process of its session at once (shared by the tests
that kill drivers: tests/test_nightly.py, tests/test_faults.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def session_pids(session: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, sid in (line.split() for line in out.splitlines()) if int(sid) == session]


def kill_session(session: int) -> None:
    """SIGKILL every process of the job's session at once, the driver and the Ray it started, as a
    machine loss or `systemctl kill` of the unit does (killpg alone misses the Ray processes that
    sit in process groups of their own)."""
    for pid in session_pids(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_session_gone(session: int) -> None:
    """No process of the killed job's session (its Ray included) outlives it; any left are ours to end."""
    deadline = time.monotonic() + 30
    while True:
        left = session_pids(session)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed job outlived it: {left}"
