"""Elastic pools: grow or shrink a pool at run time, drain one worker. A mixin of `gateway.Cluster`.

Growing starts workers through the launcher; each takes traffic once its Ready arrives, like any
worker. Shrinking drains the least-loaded workers. Draining takes a worker out of routing for new
requests; the requests it holds finish there. Past the deadline the rest are failed over to other
workers through the orchestrator (the same no-gap, no-duplicate re-placement a death causes). Then
the worker gets a Shutdown, and once it has exited it is removed (its pool target already counts
it out, so nothing replaces it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from splitserve.cluster import messages as m
from splitserve.cluster.launchers import WorkerState
from splitserve.cluster.orchestrator import AttemptFailed

log = logging.getLogger("splitserve.gateway")

DRAIN_DEADLINE_S = 30.0  # default time in-flight requests get to finish on a draining worker
MAX_DRAIN_DEADLINE_S = 3600.0
STOP_GRACE_S = 10.0  # after its Shutdown, a drained worker that has not exited is killed
MAX_POOL_WORKERS = 64
RECENT_DRAINS = 16


class ScaleError(ValueError):
    """A scale or drain request that cannot be done as asked (HTTP 400)."""


class UnknownWorker(KeyError):
    """No worker has this id (HTTP 404)."""


@dataclass(frozen=True)
class ScaleResult:
    targets: dict[str, int]  # role -> workers the pool now aims for
    started: list[str]  # ids of the workers this call launched
    draining: list[str]  # ids of the workers this call began to drain
    capacity: dict[str, str] = field(default_factory=dict)  # role -> why its new workers cannot be placed yet

    def as_dict(self) -> dict:
        return {"targets": dict(self.targets), "started": list(self.started), "draining": list(self.draining),
                "capacity": dict(self.capacity)}


@dataclass
class DrainRecord:
    worker_id: str
    deadline_s: float
    began: float  # monotonic
    moved: int = 0  # in-flight requests re-placed elsewhere when the deadline passed
    seconds: float | None = None  # from drain to exit

    def as_dict(self) -> dict:
        return {"worker": self.worker_id, "deadline_s": self.deadline_s, "moved": self.moved,
                "seconds": None if self.seconds is None else round(self.seconds, 3)}


class ElasticPools:
    """Scale and drain methods of `Cluster` (workers, router, attempts and launcher live there)."""

    def _pool_members(self, role: str) -> list:
        """Launched workers of `role` that count toward its target (not draining or drained)."""
        return [w for w in self.workers.values() if w.role == role and w.launch is not None
                and w.state is not WorkerState.DRAINING and w.worker_id not in self._retiring]

    def scale(self, prefill: int | None = None, decode: int | None = None, *,
              drain_deadline_s: float = DRAIN_DEADLINE_S) -> ScaleResult:
        """Set pool sizes. Aggregated servers have one pool ("both"): `decode` sizes it.
        Raises ScaleError for input it cannot apply (nothing changes then)."""
        wanted = self._check_scale(prefill, decode)
        _check_deadline(drain_deadline_s)
        started, draining, capacity = [], [], {}
        for role, target in wanted.items():
            members = self._pool_members(role)
            self.targets[role] = target
            if target > len(members):
                why = self.launcher.request_capacity(role, target - len(members))
                if why:
                    capacity[role] = why
                    log.warning("scale %s to %d: %s", role, target, why)
                for _ in range(target - len(members)):
                    started.append(self._add_worker(role).worker_id)
            for w in self._least_loaded(members)[:max(0, len(members) - target)]:
                self._begin_drain(w, drain_deadline_s)
                draining.append(w.worker_id)
        log.info("scaled to %s: started %s, draining %s", self.targets, started or "none", draining or "none")
        self._changed.set()
        return ScaleResult(dict(self.targets), started, draining, capacity)

    def _check_scale(self, prefill, decode) -> dict[str, int]:
        if self._closing:
            raise ScaleError("the server is shutting down")
        for name, value in (("prefill", prefill), ("decode", decode)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ScaleError(f"{name} must be an integer")
            if value is not None and not 0 <= value <= MAX_POOL_WORKERS:
                raise ScaleError(f"{name} must be between 0 and {MAX_POOL_WORKERS}")
        if prefill is None and decode is None:
            raise ScaleError("give prefill and/or decode worker counts")
        if decode is not None and decode < 1:
            raise ScaleError("at least one decode worker is needed")
        if "both" in self.engines:  # aggregated: one pool
            if prefill:
                raise ScaleError("an aggregated server has no prefill pool (start it with --disaggregated)")
            return {} if decode is None else {"both": decode}
        wanted = {}
        for role, value in (("prefill", prefill), ("decode", decode)):
            if value is not None:
                if role not in self.engines:
                    raise ScaleError(f"this server has no {role} pool")
                wanted[role] = value
        return wanted

    def _add_worker(self, role: str):
        from splitserve.cluster.supervision import WorkerHandle

        wid = f"{role}-{self._next_index}"
        self._next_index += 1
        w = self.workers[wid] = WorkerHandle(wid, role, self.engines[role], self._inbox_bind(wid))
        self._spawn(w)
        return w

    def _least_loaded(self, workers: list) -> list:
        """Drain order: workers not yet serving first, then by the requests they hold."""
        def key(w):
            held = sum(1 for a in self.attempts.values() if self._holds(w.worker_id, a))
            s = w.stats
            return (w.state is WorkerState.READY, held, s.num_running + s.num_waiting if s else 0, w.worker_id)
        return sorted(workers, key=key)

    def drain(self, worker_id: str, deadline_s: float = DRAIN_DEADLINE_S) -> dict:
        """Stop routing to `worker_id`; its requests get `deadline_s` to finish, then move; then it
        stops and is removed. Returns the drain's record. Raises UnknownWorker or ScaleError."""
        _check_deadline(deadline_s)
        w = self.workers.get(worker_id)
        if w is None or w.state is WorkerState.DEAD:
            raise UnknownWorker(worker_id)
        if self._closing:
            raise ScaleError("the server is shutting down")
        if w.state is WorkerState.DRAINING or worker_id in self._retiring:
            return self._retiring[worker_id].as_dict()
        decoders = [v for v in self.workers.values() if v.role in ("decode", "both") and v is not w
                    and v.state is not WorkerState.DRAINING and v.state is not WorkerState.DEAD]
        if w.role in ("decode", "both") and not decoders:
            raise ScaleError(f"{worker_id} is the last decode worker; scale up before draining it")
        if w.launch is not None and w.role in self.targets:
            self.targets[w.role] = max(0, len(self._pool_members(w.role)) - 1)
        return self._begin_drain(w, deadline_s).as_dict()

    def _begin_drain(self, w, deadline_s: float) -> DrainRecord:
        log.info("draining %s (%s), deadline %.1fs", w.worker_id, w.state, deadline_s)
        record = self._retiring[w.worker_id] = DrainRecord(w.worker_id, deadline_s, time.monotonic())
        w.state = WorkerState.DRAINING
        self.router.set_health(w.worker_id, False)
        self._tasks.append(asyncio.create_task(self._drain(w, record)))
        self._changed.set()
        return record

    def _held_by(self, worker_id: str) -> list:
        return [a for a in self.attempts.values() if self._holds(worker_id, a)]

    def _worker_idle(self, w, since: float) -> bool:
        """No request or transfer left on it, by a load report sent after `since`."""
        s = w.stats
        return s is not None and w.stats_at > since and s.num_running == 0 and s.num_waiting == 0 \
            and s.num_waiting_for_kv == 0 and s.active_transfers == 0

    async def _drain(self, w, record: DrainRecord) -> None:
        deadline = record.began + record.deadline_s
        idle_since = None
        while w.ready is not None and time.monotonic() < deadline:
            if self._held_by(w.worker_id):
                idle_since = None
            else:
                idle_since = idle_since or time.monotonic()
                if self._worker_idle(w, idle_since):
                    break
            await asyncio.sleep(0.05)
        left = self._held_by(w.worker_id)
        record.moved = len(left)
        for a in left:
            a.queue.put_nowait(AttemptFailed(f"worker {w.worker_id} was drained", m.FailureReason.WORKER_DIED))
        if left:
            log.warning("drain of %s: deadline passed, %d request(s) re-placed", w.worker_id, len(left))
        moved_by = time.monotonic() + 2.0
        while self._held_by(w.worker_id) and time.monotonic() < moved_by:  # their aborts go out first
            await asyncio.sleep(0.02)
        await self._retire(w)
        record.seconds = time.monotonic() - record.began
        self._retiring.pop(w.worker_id, None)
        self.drains.append(record)
        del self.drains[:-RECENT_DRAINS]
        log.info("drained %s in %.2fs (%d request(s) moved)", w.worker_id, record.seconds, record.moved)

    async def _retire(self, w) -> None:
        """Stop a drained worker and wait until it is gone from the cluster."""
        if w.launch is None:  # joined by hand: tell it to stop, forget it
            if w.push is not None:
                self._post(w, m.Shutdown())
            self._forget(w)
            return
        self._stop_worker(w)
        kill_at = time.monotonic() + STOP_GRACE_S
        while w.worker_id in self.workers and self.workers[w.worker_id] is w:
            if time.monotonic() > kill_at:
                log.error("drained worker %s did not exit; killing it", w.worker_id)
                self.launcher.kill(w.launch)
                kill_at = float("inf")
            await asyncio.sleep(0.05)

    async def wait_drained(self, worker_id: str, timeout: float) -> bool:
        """True once `worker_id` has left the cluster (for scripts and tests)."""
        end = time.monotonic() + timeout
        while worker_id in self.workers and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return worker_id not in self.workers

    def pools_info(self) -> dict:
        out = {}
        for role, target in self.targets.items():
            ws = [w for w in self.workers.values() if w.role == role]
            count = {s.value: sum(1 for w in ws if w.state is s) for s in WorkerState}
            out[role] = {"target": target, **count}
        return out


def _check_deadline(deadline_s) -> None:
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) \
            or not 0 <= deadline_s <= MAX_DRAIN_DEADLINE_S:
        raise ScaleError(f"deadline_s must be a number of seconds between 0 and {MAX_DRAIN_DEADLINE_S:.0f}")
