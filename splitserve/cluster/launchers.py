"""Who starts and stops worker processes: the seam between the gateway's cluster manager and the
place workers run.

The gateway (cluster/supervision.py) owns every worker's lifecycle: it admits the Ready a worker
announces, watches heartbeats, re-places the requests of a dead or drained worker and restarts
the ones it launched. A `WorkerLauncher` only starts a worker process somewhere, says when it is
gone and stops it. `LocalLauncher` runs workers as child processes of the gateway;
`cluster/ray_launcher.py` runs each one under a Ray actor (imported only with `serve --ray`).
A worker that joined by hand (`splitserve worker --join`) has no launcher: the same heartbeats
supervise it, and nobody restarts it.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Protocol

from splitserve.cluster.worker import SECRET_ENV
from splitserve.config import EngineConfig

log = logging.getLogger("splitserve.gateway")


class WorkerState(str, enum.Enum):
    """A worker as the gateway sees it (a str enum: GET /cluster shows the value)."""

    STARTING = "starting"  # launched (or restarting); not routed to until its Ready arrives
    READY = "ready"  # routed to
    SILENT = "silent"  # no heartbeat: out of routing, its requests re-placed; back in when it beats
    DRAINING = "draining"  # out of routing; its in-flight requests finish (or move), then it stops
    DEAD = "dead"  # exited; a launched worker is restarted, a joined or drained one removed

    def __str__(self) -> str:
        return self.value


ROUTABLE = frozenset({WorkerState.READY})
REACHABLE = frozenset({WorkerState.READY, WorkerState.DRAINING})  # the gateway still sends to it


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a launcher needs to start one worker."""

    worker_id: str
    role: str  # "prefill" | "decode" | "both"
    engine: EngineConfig
    inbox_bind: str  # ipc://PATH or tcp://HOST:PORT; a launcher placing it elsewhere may choose its own
    gateway_addr: str  # the collector, as this worker's host reaches it
    segment_owner: str  # prefix of its shared-memory segments
    eos_token_ids: tuple[int, ...]
    log_level: str

    def argv(self, inbox_bind: str, gateway_addr: str, parent_pid: int) -> list[str]:
        """The worker process's command line (`python -m splitserve.cluster.worker ...`)."""
        return [sys.executable, "-m", "splitserve.cluster.worker", "--id", self.worker_id, "--role", self.role,
                "--inbox", inbox_bind, "--gateway", gateway_addr, "--cluster-id", self.segment_owner,
                "--config", json.dumps(asdict(self.engine)), "--eos", json.dumps(sorted(self.eos_token_ids)),
                "--parent-pid", str(parent_pid), "--log-level", self.log_level]


class WorkerLauncher(Protocol):
    """Starts workers and reports their exits. A launch handle is opaque to the gateway."""

    kind: str  # "local" | "ray"
    collector_host: str | None  # bind the collector on this host's TCP too (workers elsewhere reach it)
    tcp_inbox: bool  # workers bind a TCP inbox (they may live on other hosts)

    def start(self, spec: WorkerSpec, secret: bytes) -> object: ...

    def pid(self, launch: object) -> int | None:
        """The worker process's pid once known (the only pid whose Ready may claim this worker id)."""

    def where(self, launch: object) -> str | None:
        """The node it runs on, where the launcher knows nodes (Ray's node id); None locally."""

    def exited(self, launch: object) -> str | None:
        """None while it runs; why it is gone once it is."""

    def stop(self, launch: object) -> None:
        """Ask it to end now (SIGTERM: it removes its shared memory first). Never blocks."""

    def kill(self, launch: object) -> None:
        """End it without asking."""

    def close(self) -> None:
        """After every worker ended: release what the launcher holds (a Ray connection)."""

    def request_capacity(self, role: str, count: int) -> str | None:
        """Before `count` more `role` workers start: None when they can be placed now; otherwise
        why not (and, where the launcher can, it has asked for the resources)."""


class LocalLauncher:
    """Workers as child processes of the gateway (they die with it: PDEATHSIG and a parent check)."""

    kind = "local"
    collector_host = None
    tcp_inbox = False

    def start(self, spec: WorkerSpec, secret: bytes) -> subprocess.Popen:
        if spec.inbox_bind.startswith("ipc://"):
            try:
                os.unlink(spec.inbox_bind[len("ipc://"):])
            except FileNotFoundError:
                pass
        env = dict(os.environ, **{SECRET_ENV: secret.decode()})
        return subprocess.Popen(spec.argv(spec.inbox_bind, spec.gateway_addr, os.getpid()), env=env)

    def pid(self, launch: subprocess.Popen) -> int | None:
        return launch.pid

    def where(self, launch: subprocess.Popen) -> str | None:
        return None

    def exited(self, launch: subprocess.Popen) -> str | None:
        code = launch.poll()
        return None if code is None else f"exit code {code}"

    def stop(self, launch: subprocess.Popen) -> None:
        if launch.poll() is None:
            launch.terminate()

    def kill(self, launch: subprocess.Popen) -> None:
        if launch.poll() is None:
            launch.kill()
            launch.wait()

    def close(self) -> None:
        pass

    def request_capacity(self, role: str, count: int) -> str | None:
        return None  # this host runs what it is asked to (the OS shares its cores)
