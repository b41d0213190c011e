"""Killing a job as a machine loss does: every process of its session at once (shared by the tests
that kill drivers: tests/test_nightly.py, tests/test_faults.py), and the machine's processes by
session, parent and title (which Ray sets to the task a worker runs)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def processes() -> list[tuple[int, int, int, str]]:
    """(pid, session, parent pid, title) of every process on this machine."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    rows = (line.split(None, 3) for line in out.splitlines())
    return [(int(pid), int(sid), int(ppid), title) for pid, sid, ppid, title in rows]


def session_pids(session: int) -> list[int]:
    return [pid for pid, sid, _, _ in processes() if sid == session]


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
