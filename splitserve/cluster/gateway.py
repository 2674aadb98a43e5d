"""The gateway's view of the cluster: workers, router, request orchestration and failover.

One object serves both modes. Aggregated: one worker of role "both". Disaggregated: prefill and
decode pools; for each request the pure router picks a decode worker and maybe a prefill worker,
the decode worker reserves blocks while the prefill worker computes and ships KV layer by layer,
the first token streams straight from the prefill worker.

Failover: the gateway remembers the tokens each request has streamed. When an attempt fails (a
worker died, a transfer failed: a `FailureReason`), `cluster/orchestrator.py` decides whether to
place it again with prompt + streamed tokens: the stream continues with no gap and no duplicate
(sampling is seeded per token index). A supervisor restarts dead local workers. A worker whose heartbeats stop is taken out
of routing and its requests re-placed the same way (cluster/liveness.py). Every socket is
CURVE-authenticated and encrypted (cluster/security.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import AsyncIterator

import zmq
import zmq.asyncio

from splitserve.cluster import liveness, security
from splitserve.cluster import messages as m
from splitserve.cluster.admission import AdmissionConfig
from splitserve.cluster.elastic import ElasticPools
from splitserve.cluster.gateway_queue import GatewayQueue, GatewayQueueFull
from splitserve.cluster.launchers import REACHABLE, LocalLauncher, WorkerLauncher, WorkerState
from splitserve.cluster.logthrottle import ThrottledWarning
from splitserve.cluster.orchestrator import AttemptFailed, Outcome, RequestOrchestration
from splitserve.cluster.supervision import WorkerHandle, WorkerSupervision
from splitserve.cluster.router import NoWorkerAvailable, Placement, Router, RouterConfig
from splitserve.config import EngineConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv import shm

log = logging.getLogger("splitserve.gateway")

WAIT_FOR_WORKER_S = 60.0


class EngineDeadError(RuntimeError):
    """No worker could finish the request (the server answers 503)."""


class EngineRequestError(ValueError):
    """A worker rejected the request (its message is safe to show to the client)."""


_END = object()


@dataclass(frozen=True)
class PoolSpec:
    role: str  # "prefill" | "decode" | "both"
    count: int
    engine: EngineConfig



@dataclass
class Attempt:
    sub_id: str
    request_id: str
    queue: asyncio.Queue
    placement: Placement
    workers: tuple[str, ...]
    t_dispatch: float
    t_first: float | None = None
    # Disaggregated: the decode worker's tokens wait here until the prefill worker's first token
    # arrived. They travel on different sockets, so the second token can overtake the first.
    held: list | None = None

    def deliver(self, worker_id: str, item) -> None:
        """Queue a worker's output for the request, in token order."""
        if self.held is None:
            self.queue.put_nowait(item)
        elif worker_id == self.placement.prefill_worker:
            self.queue.put_nowait(item)
            for early in self.held:
                self.queue.put_nowait(early)
            self.held = None
        else:
            self.held.append(item)


class Cluster(WorkerSupervision, ElasticPools):
    def __init__(self, pools: list[PoolSpec], eos_token_ids: frozenset[int], *, router_config: RouterConfig = RouterConfig(),
                 kv_transport: str = "auto", log_level: str = "INFO",
                 join_address: str | None = None, secret: str | None = None,
                 admission: AdmissionConfig = AdmissionConfig(), launcher: WorkerLauncher | None = None) -> None:
        if kv_transport not in ("auto", "shm", "tcp"):
            raise ValueError("kv_transport must be auto, shm or tcp")
        self.pools = pools
        self.engines = {p.role: p.engine for p in pools}  # what a pool's new workers run
        self.targets = {p.role: p.count for p in pools}  # elastic pool sizes (cluster/elastic.py)
        self.launcher = launcher or LocalLauncher()
        self.eos_token_ids = eos_token_ids
        self.router = Router(router_config)
        # disaggregated: a request's prefill starts when a decode worker can take it
        self.queue = GatewayQueue(admission, self.router.workers.values(), lambda t: self._place_now(t, True))
        self.kv_transport = kv_transport
        self.log_level = log_level
        self.cluster_id = secrets.token_hex(4)
        self.secret = security.check_secret_strength(secret) if secret else secrets.token_hex(16).encode()
        self.keys = security.derive_keys(self.secret)
        self.ctx = zmq.asyncio.Context()
        self._auth = security.start_authenticator(self.ctx, self.keys)
        self._dir = tempfile.mkdtemp(prefix="splitserve-")
        os.chmod(self._dir, 0o700)
        self.collector = security.secure_server(self.ctx.socket(zmq.PULL), self.keys, security.MAX_CONTROL_MSG_BYTES,
                                                security.CONTROL_RCVHWM)
        self.collector.setsockopt(zmq.LINGER, 0)
        self.collector_addr = f"ipc://{self._dir}/gateway.sock"
        self.collector.bind(self.collector_addr)
        self.worker_gateway_addr = self.collector_addr  # where launched workers send
        if self.launcher.collector_host:  # workers on other hosts: the collector on this host's TCP address
            self.collector.bind(f"tcp://{self.launcher.collector_host}:0")
            self.worker_gateway_addr = self.collector.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.join_address = None
        if join_address:  # workers on other hosts connect here
            self.collector.bind(f"tcp://{join_address}")
            self.join_address = self.collector.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.workers: dict[str, WorkerHandle] = {}
        self.attempts: dict[str, Attempt] = {}
        self.current: dict[str, str] = {}  # request id -> its live attempt's sub id
        self.num_replaced = 0
        self.replaced_by_reason: dict[str, int] = {}  # FailureReason value -> re-placements
        self.num_restarts = 0
        self.phase = {"prefill_s": 0.0, "prefill_n": 0, "decode_s": 0.0, "decode_n": 0}
        self._tasks: list[asyncio.Task] = []
        self.monitor = None  # a LoadMonitor while the autoscaler runs (cluster/autoscale_setup.py)
        self.autoscaler = None
        self._closing = False
        self._changed = asyncio.Event()
        self.startup_error: str | None = None
        self._silence = liveness.SilenceClock()
        self._warn_dropped = ThrottledWarning(log)
        self._warn_refused = ThrottledWarning(log)
        self._started = False
        self._retiring: dict = {}  # worker id -> DrainRecord while it drains
        self.drains: list = []  # recent finished drains
        self._next_index = 0
        for pool in pools:
            for _ in range(pool.count):
                wid = f"{pool.role}-{self._next_index}"
                self._next_index += 1
                self.workers[wid] = WorkerHandle(wid, pool.role, pool.engine, self._inbox_bind(wid))

    def _inbox_bind(self, worker_id: str) -> str:
        if self.kv_transport == "tcp" or self.launcher.tcp_inbox:
            return "tcp://127.0.0.1:0"  # a launcher placing workers on other hosts binds its node's address
        return f"ipc://{self._dir}/{worker_id}.sock"

    @property
    def mode(self) -> str:
        return "aggregated" if all(w.role == "both" for w in self.workers.values()) else "disaggregated"

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, timeout: float = 600.0) -> None:
        for w in self.workers.values():
            self._spawn(w)
        self._tasks.append(asyncio.create_task(self._read_loop()))
        self._tasks.append(asyncio.create_task(self._supervise_loop()))
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready_event.wait() for w in self.workers.values())), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"workers not ready after {timeout:.0f}s") from None
        failed = [w.worker_id for w in self.workers.values() if w.ready is None]
        if failed:
            raise RuntimeError(self.startup_error or f"workers failed to start: {', '.join(failed)}")
        self._started = True

    def add_background(self, coro) -> None:
        """A task that lives as long as the cluster (cancelled by shutdown)."""
        self._tasks.append(asyncio.create_task(coro))

    @property
    def healthy(self) -> bool:
        return any(w.state is WorkerState.READY and w.role in ("decode", "both") for w in self.workers.values())

    @property
    def max_model_len(self) -> int:
        lens = [w.ready.max_model_len for w in self.workers.values() if w.ready]
        return min(lens) if lens else 0

    async def shutdown(self) -> None:
        if self._closing:  # the app's lifespan and the server's exit path both call this
            return
        self._closing = True
        for t in self._tasks:
            t.cancel()
        launched = [w for w in self.workers.values() if w.launch is not None]
        for w in launched:
            if w.push is not None and self.launcher.exited(w.launch) is None:
                try:
                    await w.push.send(m.encode(m.Shutdown()))
                except zmq.ZMQError:
                    pass
            elif w.ready is None:
                self.launcher.stop(w.launch)  # still starting: it cannot read a Shutdown yet
        deadline = time.monotonic() + 5
        for w in launched:
            while self.launcher.exited(w.launch) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.launcher.exited(w.launch) is None:
                self.launcher.kill(w.launch)
        await asyncio.to_thread(self.launcher.close)
        self._fail_all(EngineDeadError("server shutting down"))
        for w in self.workers.values():
            if w.push is not None:
                w.push.close(0)
        self.collector.close(0)
        self._auth.stop()
        self.ctx.term()
        removed = shm.remove_segments(self.cluster_id)
        shutil.rmtree(self._dir, ignore_errors=True)
        log.info("cluster shut down; %d shared-memory segment(s) left by workers removed", removed)

    # ---- background loops ------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            frames = await self.collector.recv_multipart()
            try:
                if len(frames) != 1:
                    raise ValueError(f"{len(frames)} frames")
                msg = m.decode_from_worker(frames[0])
            except Exception as exc:
                self._warn_dropped("dropped an undecodable worker message: %s", exc)
                continue
            try:
                self._on_message(msg)
            except Exception:
                log.exception("error handling %s", type(msg).__name__)

    def _on_message(self, msg) -> None:
        if isinstance(msg, m.Outputs):
            w = self.workers.get(msg.worker_id)
            if w is not None:
                w.last_seen = time.monotonic()
            for item in msg.items:
                a = self.attempts.get(item.request_id)
                if a is not None:
                    a.deliver(msg.worker_id, item)
        elif isinstance(msg, m.Stats):
            w = self.workers.get(msg.worker_id)
            if w is None:
                return
            w.stats = msg
            w.last_seen = w.stats_at = time.monotonic()
            self.router.update_load(msg.worker_id, kv_blocks_free=msg.kv_blocks_free, num_running=msg.num_running,
                                    num_waiting=msg.num_waiting + msg.num_waiting_for_kv,
                                    queued_prefill_tokens=msg.queued_prefill_tokens)
            if msg.kv_events:
                self.router.apply_kv_events(msg.worker_id, msg.kv_events)
            self.queue.release()
        elif isinstance(msg, m.RequestError):
            if not msg.request_id:
                self.startup_error = msg.message
                return
            a = self.attempts.get(msg.request_id)
            if a is not None:
                a.queue.put_nowait(AttemptFailed(msg.message, msg.reason))
        elif isinstance(msg, m.Heartbeat):
            w = self.workers.get(msg.worker_id)
            if w is not None and w.ready is not None and w.ready.pid == msg.pid:
                w.last_seen = time.monotonic()
                if w.state is WorkerState.SILENT:
                    self._on_worker_back(w)
        elif isinstance(msg, m.Ready):
            self._on_ready(msg)

    def _post(self, w: WorkerHandle, msg: m.Msg) -> None:
        """Queue a message for a worker without waiting (from sync code; dropped if its queue is full)."""
        try:
            fut = w.push.send(m.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        if isinstance(fut, asyncio.Future):
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _fail_all(self, exc: Exception) -> None:
        for a in list(self.attempts.values()):
            a.queue.put_nowait(exc)

    # ---- requests --------------------------------------------------------------------------
    @property
    def num_inflight(self) -> int:
        return len(self.current)

    async def _send(self, worker_id: str, msg: m.Msg) -> None:
        w = self.workers.get(worker_id)
        if w is None or w.push is None or w.state not in REACHABLE:
            raise AttemptFailed(f"worker {worker_id} is not available", m.FailureReason.WORKER_DIED)
        try:
            data = m.encode(msg)
        except (TypeError, ValueError, OverflowError) as exc:  # msgspec.EncodeError is a ValueError
            raise AttemptFailed(f"the request cannot be encoded for a worker: {exc}", m.FailureReason.INVALID) from None
        await w.push.send(data)

    def _transport(self, prefill: str, decode: str) -> str:
        if self.kv_transport != "auto":
            return self.kv_transport
        p, d = self.workers[prefill].ready, self.workers[decode].ready
        return "shm" if p and d and p.host == d.host else "tcp"

    def _place_now(self, tokens: list[int], reuse_prefix: bool) -> Placement:
        """Place and account at once (no await between), so the next placement sees this one's load."""
        placement = self.router.place(tokens)
        counted = placement if reuse_prefix else Placement(placement.decode_worker, placement.prefill_worker, 0, 0)
        self.router.on_dispatch(counted, len(tokens))
        return placement

    async def _place(self, tokens: list[int], reuse_prefix: bool, admit: tuple[str, int] | None) -> Placement:
        """`admit` (request id, max_tokens): a new request, which passes decode backpressure first."""
        deadline = time.monotonic() + WAIT_FOR_WORKER_S
        while True:
            try:
                if admit is not None and self.mode == "disaggregated":
                    return await self.queue.admit(admit[0], tokens, admit[1])
                return self._place_now(tokens, reuse_prefix)
            except GatewayQueueFull as exc:
                raise EngineDeadError(str(exc)) from None
            except NoWorkerAvailable:
                restarting = any(w.state in (WorkerState.STARTING, WorkerState.SILENT) and w.role in ("decode", "both")
                                 for w in self.workers.values())
                if not restarting or time.monotonic() > deadline:
                    raise EngineDeadError("no decode worker is available") from None
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

    async def _dispatch(self, orch: RequestOrchestration, prompt: list[int], emitted: list[int],
                        params: SamplingParams, seed: int, queue: asyncio.Queue) -> Attempt:
        admit = (orch.request_id, params.max_tokens) if orch.attempts == 0 else None  # a re-placement skips the queue
        placement = await self._place(prompt + emitted, orch.reuse_prefix, admit)
        d = placement.decode_worker
        plan = orch.plan(placement, self.workers[d].ready.block_size if self.workers[d].ready else 1)
        p = plan.prefill_worker
        if not orch.reuse_prefix:
            placement = Placement(d, p, 0, 0)
        attempt = self.attempts[plan.sub_id] = Attempt(plan.sub_id, orch.request_id, queue, placement,
                                                       (d,) if p is None else (d, p), time.perf_counter(),
                                                       held=None if p is None else [])
        self.current[orch.request_id] = plan.sub_id
        outs = list(emitted)
        try:
            if p is None:
                await self._send(d, m.AddRequest(plan.sub_id, prompt, params, seed, outs, plan.resumed))
            else:
                transport = self._transport(p, d)
                pw, dw = self.workers[p], self.workers[d]
                await self._send(d, m.ReserveKV(plan.sub_id, prompt, params, seed, plan.reuse_tokens, outs, pw.address,
                                                pw.ready.pid if pw.ready else 0, transport))
                data_addr = dw.ready.kv_data_addr if transport == "tcp" and dw.ready else ""
                reader_pid = dw.ready.pid if transport == "shm" and dw.ready else 0  # frees its arena regions if it dies
                await self._send(p, m.PrefillRequest(plan.sub_id, prompt, params, seed, d, dw.address, plan.reuse_tokens,
                                                     transport, outs, data_addr, plan.resumed, reader_pid))
        except BaseException:
            # never leave an attempt recorded that nobody waits for (shielded: a cancelled client too)
            await asyncio.shield(self._abort_attempt(attempt))
            raise
        return attempt

    async def _abort_attempt(self, a: Attempt, stopped: bool = False) -> None:
        self.attempts.pop(a.sub_id, None)
        for wid in a.workers:
            try:
                await self._send(wid, m.AbortRequests([a.sub_id], stopped))
            except AttemptFailed:
                pass

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       seed: int) -> AsyncIterator[m.TokenOut]:
        """Yield the request's tokens, surviving worker deaths. Aborts everywhere if the consumer leaves."""
        if not self.healthy:
            raise EngineDeadError("no decode worker is ready")
        if request_id in self.current:
            raise EngineRequestError(f"duplicate request id {request_id!r}")
        queue: asyncio.Queue = asyncio.Queue()
        emitted: list[int] = []
        attempt: Attempt | None = None
        orch = RequestOrchestration(request_id)
        done = False
        self.current[request_id] = ""
        timer = self.monitor.start(len(prompt_token_ids), params.max_tokens) if self.monitor is not None else None
        try:
            while not done:
                try:
                    attempt = await self._dispatch(orch, prompt_token_ids, emitted, params, seed, queue)
                    while True:
                        item = await queue.get()
                        if item is _END:
                            done = True
                            break
                        if isinstance(item, Exception):
                            raise item
                        if item.request_id != attempt.sub_id:
                            continue  # a late message from an abandoned attempt
                        if item.token is not None:
                            emitted.append(item.token)
                            if timer is not None:
                                timer.on_token(item.num_cached_tokens)
                            if attempt.t_first is None:
                                attempt.t_first = time.perf_counter()
                                self.phase["prefill_s"] += attempt.t_first - attempt.t_dispatch
                                self.phase["prefill_n"] += 1
                        out = m.TokenOut(request_id, item.token, item.logprob, item.top_logprobs, item.finish_reason,
                                         item.stop_reason, item.num_prompt_tokens, item.num_cached_tokens,
                                         prompt_logprobs=item.prompt_logprobs)
                        if item.finish_reason is not None:
                            done = True
                            orch.on_done()
                            if attempt.t_first is not None:
                                self.phase["decode_s"] += time.perf_counter() - attempt.t_first
                                self.phase["decode_n"] += 1
                            await self._abort_attempt(attempt)  # frees a reservation the decode side still holds
                            attempt = None
                        yield out
                        if done:
                            break
                except AttemptFailed as f:
                    if attempt is not None:
                        await self._abort_attempt(attempt)
                        attempt = None
                    outcome = orch.on_failure(f.reason).outcome
                    if outcome is not Outcome.RETRY:
                        raise (EngineRequestError(str(f)) if outcome is Outcome.CLIENT_ERROR else
                               EngineDeadError(f"request failed after {orch.attempts} placement(s): {f}")) from None
                    log.warning("re-placing %s after %d streamed tokens: %s", request_id, len(emitted), f)
                    self.num_replaced += 1
                    self.replaced_by_reason[f.reason.value] = self.replaced_by_reason.get(f.reason.value, 0) + 1
                    queue = asyncio.Queue()
        finally:
            self.current.pop(request_id, None)
            if timer is not None:
                self.monitor.finish(timer)
            if attempt is not None:
                await self._abort_attempt(attempt)

    async def finish_stream(self, request_id: str, stopped: bool = True) -> None:
        """End a stream from the gateway side (a stop string matched)."""
        sub = self.current.get(request_id)
        a = self.attempts.get(sub) if sub else None
        if a is not None:
            a.queue.put_nowait(_END)
            await self._abort_attempt(a, stopped)

    async def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            sub = self.current.get(rid)
            a = self.attempts.get(sub) if sub else None
            if a is not None:
                a.queue.put_nowait(EngineDeadError("aborted"))
                await self._abort_attempt(a)

    # ---- introspection ---------------------------------------------------------------------
    def info(self) -> dict:
        workers = []
        for w in self.workers.values():
            s = w.stats
            workers.append({
                "id": w.worker_id, "role": w.role, "address": w.address, "pid": w.ready.pid if w.ready else (
                    self._launched_pid(w)), "launcher": self.launcher.kind if w.launch is not None else "joined",
                "node": self.launcher.where(w.launch) if w.launch is not None else None,
                "host": w.ready.host if w.ready else None, "state": w.state.value, "restarts": w.restarts,
                "load": None if s is None else {
                    "num_waiting": s.num_waiting, "num_running": s.num_running,
                    "num_waiting_for_kv": s.num_waiting_for_kv, "queued_prefill_tokens": s.queued_prefill_tokens,
                    "kv_blocks_used": s.kv_blocks_used, "kv_blocks_free": s.kv_blocks_free, "num_steps": s.num_steps,
                    "step_seconds": round(s.step_seconds, 6),  # busy time inside engine steps
                    "decode_steps": s.decode_steps, "decode_step_seconds": round(s.decode_step_seconds, 6),
                },
                "transfers": None if s is None else {
                    "active": s.active_transfers, "bytes_sent": s.kv_bytes_sent, "bytes_received": s.kv_bytes_received,
                    "bytes_direct": s.kv_bytes_direct,  # no staging copy (shm placement / TCP data port)
                    "done": s.kv_transfers_done, "failed": s.kv_transfers_failed,
                    "gb_per_s": (s.kv_bytes_received / s.kv_transfer_seconds / 1e9) if s.kv_transfer_seconds else None,
                },
            })
        return {"mode": self.mode, "cluster_id": self.cluster_id, "join_address": self.join_address,
                "launcher": self.launcher.kind, "pools": self.pools_info(),
                "drains": [d.as_dict() for d in self.drains] + [d.as_dict() for d in self._retiring.values()],
                "gateway_inflight": self.num_inflight,
                "gateway_queue": self.queue.info(), "requests_replaced": self.num_replaced,
                "requests_replaced_by_reason": dict(self.replaced_by_reason),
                "shm_segments": len(shm.list_segments(self.cluster_id, arenas=False)), "workers": workers,
                **({"autoscale": self.autoscaler.info()} if self.autoscaler is not None else {})}
