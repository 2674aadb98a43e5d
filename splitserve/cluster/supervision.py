"""The gateway's half of worker lifecycle: spawning local workers, admitting the ones that announce
themselves (spawned or joined), watching heartbeats and exits, and what a silent or dead worker
means for the requests it held. A mixin of `gateway.Cluster`, whose state it works on."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import zmq

from splitserve.cluster import liveness, security
from splitserve.cluster import messages as m
from splitserve.cluster.launchers import WorkerSpec, WorkerState
from splitserve.cluster.orchestrator import AttemptFailed
from splitserve.cluster.router import WorkerView
from splitserve.config import EngineConfig
from splitserve.kv import shm

log = logging.getLogger("splitserve.gateway")


@dataclass
class WorkerHandle:
    worker_id: str
    role: str
    engine: EngineConfig | None  # None for workers that joined from elsewhere
    inbox_bind: str
    launch: object = None  # the launcher's handle; None: joined by hand (never restarted)
    ready: m.Ready | None = None
    stats: m.Stats | None = None
    state: WorkerState = WorkerState.STARTING
    restarts: int = 0
    stats_at: float = 0.0  # when its last Stats arrived (monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    push: object = None
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)

    def __setattr__(self, name: str, value) -> None:
        if name == "state":
            value = WorkerState(value)  # a name that is not a state fails here, not later
        super().__setattr__(name, value)

    @property
    def address(self) -> str:
        return self.ready.address if self.ready else self.inbox_bind


class WorkerSupervision:
    """Lifecycle methods of `Cluster` (workers, router, attempts, queue and sockets live there)."""

    def _spawn(self, w: WorkerHandle) -> None:
        w.ready = None
        w.state = WorkerState.STARTING
        w.ready_event.clear()
        spec = WorkerSpec(w.worker_id, w.role, w.engine, w.inbox_bind, self.worker_gateway_addr,
                          self._segment_owner(w.worker_id), tuple(sorted(self.eos_token_ids)), self.log_level)
        w.launch = self.launcher.start(spec, self.secret)
        w.last_seen = time.monotonic()
        log.info("spawned %s (%s launcher, pid %s)", w.worker_id, self.launcher.kind, self.launcher.pid(w.launch))

    def _launched_pid(self, w: WorkerHandle | None) -> int | None:
        return self.launcher.pid(w.launch) if w is not None and w.launch is not None else None

    def _stop_worker(self, w: WorkerHandle) -> None:
        """Ask a launched worker to end: a Shutdown if it is reachable, the launcher's stop otherwise."""
        if w.launch is None or self.launcher.exited(w.launch) is not None:
            return
        if w.push is not None and w.ready is not None:
            self._post(w, m.Shutdown())
        else:
            self.launcher.stop(w.launch)

    def _on_ready(self, msg: m.Ready) -> None:
        w = self.workers.get(msg.worker_id)
        if w is not None and w.ready is not None and (w.ready.pid, w.ready.address) == (msg.pid, msg.address):
            self._post(w, m.Welcome(msg.worker_id))  # it announced itself again before our welcome arrived
            return
        refusal = security.join_refusal(msg, self._launched_pid(w), w.role if w else None,
                                        w.state.value if w else None)
        if refusal:
            self._warn_refused("refused worker %s (pid %d on %s): %s", msg.worker_id, msg.pid, msg.host, refusal)
            return
        if w is not None and w.state is WorkerState.DRAINING:
            return  # drained while it started: it is being stopped
        if w is None:  # a worker joining from another host
            w = WorkerHandle(msg.worker_id, msg.role, None, msg.address)
            self.workers[msg.worker_id] = w
            log.info("worker %s (%s) joined from %s", msg.worker_id, msg.role, msg.host)
        elif w.push is not None:
            w.push.close(0)
        w.ready = msg
        w.state = WorkerState.READY
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
                if w.state is WorkerState.DEAD:
                    continue
                why = self.launcher.exited(w.launch) if w.launch is not None else None
                if why is not None:
                    self._on_worker_death(w, why)
                    continue
                over = self._silence.silent_for(w.last_seen, now)
                if not judging or over <= 0:
                    continue
                if w.state is WorkerState.READY:
                    self._on_worker_silent(w, over + self._silence.timeout_s)
                elif w.state is WorkerState.SILENT and over > liveness.SILENT_GIVE_UP_S:
                    if w.launch is not None:  # wedged: kill it; the next round restarts it
                        log.error("worker %s silent for %.0fs; killing it", w.worker_id, over)
                        self.launcher.kill(w.launch)
                    else:
                        self._on_worker_death(w, "no heartbeat")

    def _on_worker_silent(self, w: WorkerHandle, seconds: float) -> None:
        """No heartbeat: out of routing, its requests placed again. It is aborted there too (queued,
        it reads them if it wakes up), and routed to again when its heartbeats come back."""
        log.error("worker %s silent for %.1fs: out of routing, its requests re-placed", w.worker_id, seconds)
        w.state = WorkerState.SILENT
        self.router.set_health(w.worker_id, False)
        touched = [a for a in self.attempts.values() if w.worker_id in a.workers]
        if touched and w.push is not None:
            self._post(w, m.AbortRequests([a.sub_id for a in touched]))
        for a in touched:
            a.queue.put_nowait(AttemptFailed(f"worker {w.worker_id} is silent", m.FailureReason.WORKER_DIED))
        self._changed.set()

    def _on_worker_back(self, w: WorkerHandle) -> None:
        log.warning("worker %s is beating again: back in routing", w.worker_id)
        w.state = WorkerState.READY
        self.router.set_health(w.worker_id, True)
        self._changed.set()

    def _on_worker_death(self, w: WorkerHandle, why: str) -> None:
        was_ready = w.ready is not None
        retired = w.state is WorkerState.DRAINING
        (log.info if retired else log.error)("worker %s %s (%s)", w.worker_id, "stopped" if retired else "died", why)
        w.state = WorkerState.DEAD
        w.ready = None
        self.router.set_health(w.worker_id, False)
        # Shared-memory janitor: what the dead worker wrote, and what was on its way to it.
        shm.remove_segments(self._segment_owner(w.worker_id))
        for a in list(self.attempts.values()):
            if self._holds(w.worker_id, a) or (not retired and w.worker_id in a.workers):
                if a.placement.prefill_worker is not None:
                    shm.unlink(shm.segment_name(self._segment_owner(a.placement.prefill_worker), a.sub_id))
                a.queue.put_nowait(AttemptFailed(f"worker {w.worker_id} died ({why})", m.FailureReason.WORKER_DIED))
        if not was_ready and not retired and w.restarts == 0 and not self.num_restarts and not self._started:
            self.startup_error = self.startup_error or f"{w.worker_id} exited during startup ({why})"
            w.ready_event.set()
            return
        if w.launch is not None and not retired and not self._closing:
            w.restarts += 1
            self.num_restarts += 1
            self._spawn(w)
        elif w.launch is None or retired:
            self._forget(w)

    def _forget(self, w: WorkerHandle) -> None:
        self.router.remove_worker(w.worker_id)
        self.workers.pop(w.worker_id, None)
        if w.push is not None:
            w.push.close(0)
            w.push = None
        w.ready_event.set()  # nobody waits for it any more
        self.queue.release()
        self._changed.set()

    @staticmethod
    def _holds(worker_id: str, a) -> bool:
        """Whether attempt `a` still needs this worker: its decode worker, or its prefill worker
        until the first token (after that the prefill side's work is done)."""
        return a.placement.decode_worker == worker_id or (
            a.placement.prefill_worker == worker_id and a.t_first is None)

    def _segment_owner(self, worker_id: str) -> str:
        return f"{self.cluster_id}-{worker_id}"
