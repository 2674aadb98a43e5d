"""Process checks for the Ray tests: which splitserve workers and Ray actor processes are alive."""

from __future__ import annotations

import os
import time


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def worker_processes(cluster_id: str) -> list[int]:
    """Live worker processes of the gateway whose cluster id this is (wherever Ray placed them)."""
    return [pid for pid, cmd in _cmdlines().items()
            if "splitserve.cluster.worker" in cmd and f"--cluster-id {cluster_id}-" in cmd]


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def actor_processes(cluster_id: str) -> set[int]:
    """The Ray actor processes running this gateway's workers (each worker's parent)."""
    return {parent_of(pid) for pid in worker_processes(cluster_id)} - {None}


def processes_mentioning(text: str) -> list[int]:
    me = os.getpid()
    return [pid for pid, cmd in _cmdlines().items() if text in cmd and pid != me]


def alive(pids) -> list[int]:
    from splitserve.testing import pid_alive

    return [p for p in pids if pid_alive(p)]


def wait_gone(find, timeout: float = 30.0) -> list[int]:
    """Poll `find()` until it returns nothing or the time is up; returns what is left."""
    deadline = time.time() + timeout
    left = find()
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = find()
    return left
