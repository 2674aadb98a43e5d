"""The gateway's half of worker lifecycle: spawning local workers, admitting the ones that announce
themselves (spawned or joined), watching heartbeats and exits, and what a silent or dead worker
means for the requests it held. A mixin of `gateway.Cluster`, whose state it works on."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import zmq

from splitserve.cluster import liveness, security
from splitserve.cluster import messages as m
from splitserve.cluster.orchestrator import AttemptFailed
from splitserve.cluster.router import WorkerView
from splitserve.cluster.worker import SECRET_ENV
from splitserve.config import EngineConfig
from splitserve.kv import shm

log = logging.getLogger("splitserve.gateway")


@dataclass
class WorkerHandle:
    worker_id: str
    role: str
    engine: EngineConfig | None  # None for workers that joined from elsewhere
    inbox_bind: str
    process: subprocess.Popen | None = None
    ready: m.Ready | None = None
    stats: m.Stats | None = None
    state: str = "starting"  # starting | ready | silent (no heartbeat: out of routing) | dead
    restarts: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    push: object = None
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        return self.ready.address if self.ready else self.inbox_bind


class WorkerSupervision:
    """Lifecycle methods of `Cluster` (workers, router, attempts, queue and sockets live there)."""

    def _spawn(self, w: WorkerHandle) -> None:
        w.ready = None
        w.state = "starting"
        w.ready_event.clear()
        if w.inbox_bind.startswith("ipc://"):
            try:
                os.unlink(w.inbox_bind[len("ipc://"):])
            except FileNotFoundError:
                pass
        cmd = [sys.executable, "-m", "splitserve.cluster.worker", "--id", w.worker_id, "--role", w.role,
               "--inbox", w.inbox_bind, "--gateway", self.collector_addr,
               "--cluster-id", self._segment_owner(w.worker_id),
               "--config", json.dumps(asdict(w.engine)), "--eos", json.dumps(sorted(self.eos_token_ids)),
               "--parent-pid", str(os.getpid()), "--log-level", self.log_level]
        env = dict(os.environ, **{SECRET_ENV: self.secret.decode()})
        w.process = subprocess.Popen(cmd, env=env)
        w.last_seen = time.monotonic()
        log.info("spawned %s (pid %d)", w.worker_id, w.process.pid)

    def _on_ready(self, msg: m.Ready) -> None:
        w = self.workers.get(msg.worker_id)
        if w is not None and w.ready is not None and (w.ready.pid, w.ready.address) == (msg.pid, msg.address):
            self._post(w, m.Welcome(msg.worker_id))  # it announced itself again before our welcome arrived
            return
        refusal = security.join_refusal(msg, w.process.pid if w and w.process else None, w.role if w else None,
                                        w.state if w else None)
        if refusal:
            self._warn_refused("refused worker %s (pid %d on %s): %s", msg.worker_id, msg.pid, msg.host, refusal)
            return
        if w is None:  # a worker joining from another host
            w = WorkerHandle(msg.worker_id, msg.role, None, msg.address)
            self.workers[msg.worker_id] = w
            log.info("worker %s (%s) joined from %s", msg.worker_id, msg.role, msg.host)
        elif w.push is not None:
            w.push.close(0)
        w.ready = msg
        w.state = "ready"
        w.last_seen = time.monotonic()
        w.push = security.secure_client(self.ctx.socket(zmq.PUSH), self.keys, security.MAX_CONTROL_MSG_BYTES)
        w.push.setsockopt(zmq.LINGER, 0)
        w.push.connect(msg.address)
        self._post(w, m.Welcome(msg.worker_id))
        self.router.remove_worker(msg.worker_id)
        self.router.add_worker(WorkerView(msg.worker_id, msg.role, msg.block_size, msg.num_blocks,
                                          max_running=w.engine.max_num_seqs if w.engine else 0))
        w.ready_event.set()
        self.queue.release()
        self._changed.set()

    async def _supervise_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            judging = self._silence.tick(now)
            for w in list(self.workers.values()):
                if w.state == "dead":
                    continue
                if w.process is not None and w.process.poll() is not None:
                    self._on_worker_death(w, f"exit code {w.process.returncode}")
                    continue
                over = self._silence.silent_for(w.last_seen, now)
                if not judging or over <= 0:
                    continue
                if w.state == "ready":
                    self._on_worker_silent(w, over + self._silence.timeout_s)
                elif w.state == "silent" and over > liveness.SILENT_GIVE_UP_S:
                    if w.process is not None:  # wedged: kill it; the next round restarts it
                        log.error("worker %s silent for %.0fs; killing it", w.worker_id, over)
                        w.process.kill()
                    else:
                        self._on_worker_death(w, "no heartbeat")

    def _on_worker_silent(self, w: WorkerHandle, seconds: float) -> None:
        """No heartbeat: out of routing, its requests placed again. It is aborted there too (queued,
        it reads them if it wakes up), and routed to again when its heartbeats come back."""
        log.error("worker %s silent for %.1fs: out of routing, its requests re-placed", w.worker_id, seconds)
        w.state = "silent"
        self.router.set_health(w.worker_id, False)
        touched = [a for a in self.attempts.values() if w.worker_id in a.workers]
        if touched and w.push is not None:
            self._post(w, m.AbortRequests([a.sub_id for a in touched]))
        for a in touched:
            a.queue.put_nowait(AttemptFailed(f"worker {w.worker_id} is silent", m.FailureReason.WORKER_DIED))
        self._changed.set()

    def _on_worker_back(self, w: WorkerHandle) -> None:
        log.warning("worker %s is beating again: back in routing", w.worker_id)
        w.state = "ready"
        self.router.set_health(w.worker_id, True)
        self._changed.set()

    def _on_worker_death(self, w: WorkerHandle, why: str) -> None:
        was_ready = w.ready is not None
        log.error("worker %s died (%s)", w.worker_id, why)
        w.state = "dead"
        w.ready = None
        self.router.set_health(w.worker_id, False)
        # Shared-memory janitor: what the dead worker wrote, and what was on its way to it.
        shm.remove_segments(self._segment_owner(w.worker_id))
        for a in list(self.attempts.values()):
            if w.worker_id in a.workers:
                if a.placement.prefill_worker is not None:
                    shm.unlink(shm.segment_name(self._segment_owner(a.placement.prefill_worker), a.sub_id))
                a.queue.put_nowait(AttemptFailed(f"worker {w.worker_id} died ({why})", m.FailureReason.WORKER_DIED))
        if not was_ready and w.restarts == 0 and not self.num_restarts:
            self.startup_error = self.startup_error or f"{w.worker_id} exited during startup ({why})"
            w.ready_event.set()
            return
        if w.process is not None and not self._closing:
            w.restarts += 1
            self.num_restarts += 1
            self._spawn(w)
        elif w.process is None:
            self.router.remove_worker(w.worker_id)
            del self.workers[w.worker_id]

    def _segment_owner(self, worker_id: str) -> str:
        return f"{self.cluster_id}-{worker_id}"
