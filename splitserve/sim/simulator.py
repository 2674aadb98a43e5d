"""The simulator's event loop: the live Scheduler, BlockManager and Router on a virtual clock.

Every scheduler step is simulated (iteration-level fidelity): a worker calls the real
`Scheduler.schedule()`, the cost model turns the plan into a duration, and when the step
"completes" the worker calls the real `Scheduler.advance()` (update() without its per-token
event objects) with a fake sampled token per request. Events (arrivals, step completions, KV
transfers landing) sit in one heap ordered by virtual time. Nothing here re-implements
scheduling, block allocation or routing.

Disaggregated pools (`sim/disagg.py`): the live gateway's orchestrator, the real `Router` and the
live decode side's `DecodeHandoff` place each request, reserve its blocks, retry or fail it; the
prefill worker runs the prompt as a `prefill_only` request whose first token goes to the client at
once (TTFT), and a link model delivers the KV layer by layer while the prefill runs.

Admission is bounded cluster-wide as the server bounds it: at most (max_num_seqs + max_waiting)
per decode worker in flight, and each worker's waiting queue at max_waiting; beyond, 503.
"""

from __future__ import annotations

import heapq
import random
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import cast

import numpy as np

from splitserve.bench.schema import RequestRecord
from splitserve.bench.workloads import RequestSpec, iter_units
from splitserve.cluster.admission import AdmissionConfig
from splitserve.cluster.router import Router, RouterConfig, WorkerView
from splitserve.config import SchedulerConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import QueueFull, Scheduler
from splitserve.sim.cost import StepCost
from splitserve.sim.disagg import SimDisaggregation
from splitserve.sim.hardware import Link
from splitserve.sim.records import RecordSink
from splitserve.sim.state import ADD, ARRIVE, FAKE_TOKEN, KV, STEP, SimRequest, SimWorker

__all__ = ["FAKE_TOKEN", "PoolSpec", "RecordSink", "SimConfig", "SimRequest", "SimWorker", "Simulation"]
_PREFIX_BASE = 1 << 40  # token ids of shared prefixes live far from per-request ids
_PREFIX_STRIDE = 1 << 24


def _id_range(start: int, n: int) -> array:
    """array("q") of start, start+1, ..., start+n-1 (numpy fills it ~10x faster than range)."""
    return array("q", np.arange(start, start + n, dtype=np.int64).tobytes())


@dataclass
class SimConfig:
    """Scheduler limits per worker, as `splitserve serve` takes them."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_waiting: int = 1024
    record_itl: bool = True
    router: RouterConfig = field(default_factory=RouterConfig)
    router_sample: int = 16  # place among this many randomly sampled workers when there are more
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # decode backpressure (disaggregated)
    seed: int = 0
    check_integrity: bool = False  # assert scheduler invariants after every step (tests)

    def scheduler_config(self, num_blocks: int) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, block_size=self.block_size, num_blocks=num_blocks,
            enable_prefix_caching=self.enable_prefix_caching, max_waiting=self.max_waiting,
        )


@dataclass
class PoolSpec:
    """A pool of identical workers (one Scheduler each) with one step-cost model."""

    role: str  # "both" (aggregated), "prefill", "decode"
    num_workers: int
    num_blocks: int
    cost: StepCost
    units_per_worker: float = 1.0  # hardware units one worker stands for (power and cost)
    kv_bytes_per_token: float = 0.0
    num_layers: int = 1


_START = itemgetter(1)  # of StepPlan.items tuples


class Simulation:
    """One simulated deployment driven by a workload. `run()` returns the RecordSink."""

    def __init__(self, config: SimConfig, pools: list[PoolSpec], *, link: Link | None = None,
                 sink: RecordSink | None = None, concurrency: int | None = None,
                 duration_s: float | None = None, request_delay_s: float = 0.0):
        self.cfg = config
        # Front-end latency between the client sending a request and the engine seeing it
        # (HTTP, tokenizer, queue hand-off): local-cpu's calibration measures it; 0 elsewhere.
        self.request_delay_s = request_delay_s
        self.sink = sink or RecordSink()
        self.concurrency = concurrency
        self.duration_s = duration_s
        self.link = link
        self.rng = random.Random(f"splitserve-sim:{config.seed}")
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        self.num_events = 0
        self.num_steps = 0
        self.next_token = 1 << 20
        self.prefix_cache: dict[int, array] = {}
        self.params: dict[int, SamplingParams] = {}
        self.active_units = 0
        self.errors = 0
        self.workers: list[SimWorker] = []
        self.decoders: list[SimWorker] = []
        self.prefillers: list[SimWorker] = []
        self.by_id: dict[str, SimWorker] = {}
        self.disaggregated = any(p.role == "prefill" for p in pools)
        self.kv_bytes_per_token = 0.0
        self.num_layers = 1
        for pool in pools:
            for i in range(pool.num_workers):
                wid = f"{pool.role}-{i}"
                sched = Scheduler(config.scheduler_config(pool.num_blocks))
                w = SimWorker(wid, pool.role, sched, pool.cost)
                self.workers.append(w)
                self.by_id[wid] = w
                (self.prefillers if pool.role == "prefill" else self.decoders).append(w)
            if pool.role == "decode" or pool.role == "both":
                self.kv_bytes_per_token = pool.kv_bytes_per_token
                self.num_layers = pool.num_layers
        # local-cpu workers are processes on this one machine: with measured neighbour factors, each
        # slows while another computes (shared cache and memory bandwidth).
        local = [w for w in self.workers if getattr(w.cost, "cal", None) is not None and w.cost.cal.neighbor]
        if len(local) > 1:
            for w in local:
                f = w.cost.cal.neighbor
                w.neighbor = (float(f.get("decode", 0.0)), float(f.get("prefill", 0.0)))
                w.neighbors = [o for o in local if o is not w]
        if not self.decoders:
            raise ValueError("a deployment needs decode (or aggregated) workers")
        if self.disaggregated and link is None:
            raise ValueError("a disaggregated deployment needs a KV link")
        self.use_router = self.disaggregated or len(self.decoders) > 1
        self.router = Router(config.router) if self.use_router else None
        if self.router is not None:
            for w in self.workers:
                w.view = WorkerView(w.wid, w.role, config.block_size, w.bm.num_blocks)
                self.router.add_worker(w.view)
                w.bm.events = []
        self.max_inflight = (config.max_num_seqs + config.max_waiting) * len(self.decoders)
        self.inflight = 0  # requests admitted and not yet answered
        self.disagg = SimDisaggregation(self, admission=config.admission) if self.router is not None else None

    # ---- workload -> requests ------------------------------------------------------------------
    def _push(self, t: float, kind: int, obj) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, obj))

    def _prompt_ids(self, spec: RequestSpec, prev: SimRequest | None) -> array:
        """The prompt as an array("q") (Request keeps it as one: compact, hashed without conversion)."""
        n = spec.input_len
        if prev is not None:  # agent chain step: the conversation so far + a new tool chunk
            ids = prev.token_ids
            extra = n - len(ids)
            if extra > 0:
                ids = ids + _id_range(self.next_token, extra)
                self.next_token += extra
            elif extra < 0:
                ids = ids[:n]
            return ids
        if spec.shared_prefix_len and spec.prefix_group is not None:
            pre = self.prefix_cache.get(spec.prefix_group)
            if pre is None:
                base = _PREFIX_BASE + spec.prefix_group * _PREFIX_STRIDE
                pre = self.prefix_cache[spec.prefix_group] = _id_range(base, spec.shared_prefix_len)
            own = max(n - len(pre), 1)
            ids = pre + _id_range(self.next_token, own)
            self.next_token += own
            return ids
        ids = _id_range(self.next_token, n)
        self.next_token += n
        return ids

    def _start_request(self, spec: RequestSpec, rest: list[RequestSpec], prev: SimRequest | None) -> None:
        now = self.now
        params = self.params.get(spec.output_len)  # frozen: one per length, shared
        if params is None:
            params = self.params[spec.output_len] = SamplingParams(max_tokens=spec.output_len, ignore_eos=True,
                                                                   temperature=0.0)
        ids = self._prompt_ids(spec, prev)
        req = SimRequest(str(spec.request_id), ids, params, spec, now)
        req.client = (rest, prev)
        if self.cfg.record_itl:
            req.times = array("d")
        if len(ids) >= self.cfg.max_model_len:
            self._fail(req, "http_400", f"prompt of {len(ids)} tokens does not fit max_model_len", admitted=False)
            return
        if self.request_delay_s > 0:
            self._push(now + self.request_delay_s, ADD, req)
            return
        self._submit(req)

    def _submit(self, req: SimRequest) -> None:
        if self.inflight >= self.max_inflight:  # the server's bound, cluster-wide
            self._fail(req, "http_503", "the server is overloaded; retry later", admitted=False)
            return
        self.inflight += 1
        if self.disagg is not None:
            self.disagg.submit(req)
            return
        w = self.decoders[0]
        req.worker = w
        try:
            w.sched.add_request(req)
        except QueueFull:
            self._fail(req, "http_503", "the server is overloaded; retry later")
            return
        self._wake(w)

    def _wake(self, w: SimWorker) -> None:
        if not w.busy:
            self._start_step(w)

    # ---- steps ---------------------------------------------------------------------------------
    def _start_step(self, w: SimWorker) -> None:
        plan = w.sched.schedule()
        items = plan.items
        if not items:
            w.busy = False
            w.plan = None
            return
        # Tokens, samples, attention pairs, KV tokens read. A decode-only step (the common case:
        # every chunk is one token, so the token count equals the chunk count) is summed in C.
        B = len(items)
        if B == plan.num_tokens:
            ctx = sum(map(_START, items))
            T = S = B
            A = K = ctx + B
            multi = 0
        else:
            ctx = 0
            T = S = A = K = 0
            multi = 0  # chunks of more than one token
            prefill_role = w.role == "prefill"
            for req, s, n, sample in items:
                if n == 1:
                    ctx += s
                else:
                    multi += 1
                    T += n
                    A += n * s + (n * (n + 1) >> 1)
                    K += s + n
                    if sample:
                        S += 1
                    if prefill_role:
                        twin = cast(SimRequest, req)
                        if twin.t_prefill_start < 0:
                            twin.t_prefill_start = self.now
            nd = B - multi
            if nd:
                T += nd
                S += nd
                A += ctx + nd
                K += ctx + nd
        dur = w.cost.time(T, S, A, K, B, multi)
        if w.neighbor is not None:
            for o in w.neighbors:
                if o.busy:
                    dur *= 1.0 + w.neighbor[1 if multi else 0]
                    break
        w.busy = True
        w.plan = plan
        w.busy_s += dur
        if not multi:
            w.decode_steps += 1
            w.decode_busy_s += dur
        self.seq += 1
        heapq.heappush(self.heap, (self.now + dur, self.seq, STEP, w))

    def _step_done(self, w: SimWorker) -> None:
        now = self.now
        got, finished = cast("tuple[list[SimRequest], list[SimRequest]]", w.sched.advance(w.plan, FAKE_TOKEN))
        w.steps += 1
        self.num_steps += 1
        if w.role == "prefill":
            for r in finished:
                cast(SimDisaggregation, self.disagg).prefill_done(r)
        else:
            if self.cfg.record_itl:
                now_d = array("d", (now,))  # += copies 8 bytes; array.append parses its argument
                for r in got:
                    r.times += now_d
            else:
                for r in got:
                    if r.t_first < 0:
                        r.t_first = now
            for r in finished:
                r.t_last = now
                self._finish(r)
        if self.cfg.check_integrity:
            w.sched.check_integrity()
        if self.router is not None:
            self._report(w)
            if w.handoff is not None:
                cast(SimDisaggregation, self.disagg).tick(w)
        self._start_step(w)

    def _report(self, w: SimWorker) -> None:
        s, bm = w.sched, w.bm
        router = self.router
        assert router is not None
        queued = s.num_waiting_tokens if w.role == "prefill" else 0
        router.update_load(w.wid, kv_blocks_free=bm.num_free_blocks, num_running=s.num_running,
                                num_waiting=len(s.requests) - s.num_running + (w.handoff.num_reserving if w.handoff else 0),
                                queued_prefill_tokens=queued)
        if bm.events:
            router.apply_kv_events(w.wid, bm.events)
            bm.events.clear()

    # ---- completion ----------------------------------------------------------------------------
    def _finish(self, req: SimRequest) -> None:
        spec: RequestSpec = req.spec
        n_out = req.num_output_tokens
        times = req.times
        if times:
            t_first = times[0]
            t = np.frombuffer(times)  # the gaps, as float64 arithmetic on the times: exact
            itl = ((t[1:] - t[:-1]) * 1000.0).tolist()
        else:
            t_first, itl = req.t_first, []
        ttft = (t_first - req.t_arrival) * 1000.0
        e2e = (req.t_last - req.t_arrival) * 1000.0
        tpot = (e2e - ttft) / (n_out - 1) if n_out > 1 else None
        rec = RequestRecord(
            request_id=spec.request_id, start_s=req.t_arrival, ok=True, ttft_ms=ttft, e2e_ms=e2e,
            tpot_ms=tpot, itl_ms=itl,
            input_tokens=req.num_prompt_tokens, output_tokens=n_out, expected_input_tokens=spec.input_len,
            expected_output_tokens=spec.output_len, token_source="sim", chain_id=spec.chain_id,
            step=spec.step, num_steps=spec.num_steps,
        )
        self.sink.add(rec)
        self.inflight -= 1
        self._after(req, ok=True)

    def _fail(self, req: SimRequest, error: str, detail: str, admitted: bool = True) -> None:
        spec = req.spec
        self.errors += 1
        if admitted:
            self.inflight -= 1
        rec = RequestRecord(
            request_id=spec.request_id, start_s=req.t_arrival, ok=False, e2e_ms=0.0,
            expected_input_tokens=spec.input_len, expected_output_tokens=spec.output_len,
            chain_id=spec.chain_id, step=spec.step, num_steps=spec.num_steps, error=error,
            error_detail=detail[:200], http_status=int(error[5:]) if error.startswith("http_") else None,
        )
        self.sink.add(rec)
        self._after(req, ok=False)

    def _after(self, req: SimRequest, ok: bool) -> None:
        rest, _prev = req.client
        if ok and rest:  # the chain's next step goes out as soon as this answer is complete
            self._start_request(rest[0], rest[1:], req)
            return
        self.active_units -= 1
        if self.ready:
            self._start_unit(self.ready.popleft())
        elif self.closed_loop:
            self._fill_closed()

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, specs: Iterable[RequestSpec]) -> RecordSink:
        """Units (requests or chains) start in workload order: each at its arrival time (open
        loop) or when a slot frees (closed loop), and with a concurrency limit only while fewer
        than `concurrency` units are active - as `splitserve bench` dispatches them."""
        self.units: Iterator[list[RequestSpec]] = iter_units(specs)
        self.units_done = False
        self.ready: deque = deque()
        self.closed_loop = False
        first = self._pull()
        if first is not None:
            if first[0].arrival_s is None:
                self.closed_loop = True
                self.ready.append(first)
                self._fill_closed()
            else:
                self._push(first[0].arrival_s, ARRIVE, first)
        heap = self.heap
        pop = heapq.heappop
        step_done, arrive = self._step_done, self._arrive
        n = 0
        while heap:
            t, _, kind, obj = pop(heap)
            self.now = t
            n += 1
            if kind == STEP:
                step_done(obj)
            elif kind == ARRIVE:
                arrive(obj)
            elif kind == KV:
                cast(SimDisaggregation, self.disagg).kv_landed(obj)
            else:
                self._submit(obj)
        self.num_events = n
        for w in self.workers:  # the leak check of every run: no request, reservation or block held
            if not w.sched.is_idle() or (w.handoff is not None and w.handoff.busy):
                raise RuntimeError(f"simulation ended with work or KV blocks left on {w.wid}")
        self.sink.close()
        return self.sink

    def _pull(self) -> list[RequestSpec] | None:
        if self.units_done:
            return None
        unit = next(self.units, None)
        if unit is None or (self.duration_s is not None and unit[0].arrival_s is not None
                            and unit[0].arrival_s >= self.duration_s):
            self.units_done = True
            return None
        return unit

    def _start_unit(self, unit: list[RequestSpec]) -> None:
        self.active_units += 1
        self._start_request(unit[0], unit[1:], None)

    def _arrive(self, unit: list[RequestSpec]) -> None:
        nxt = self._pull()  # open loop: exactly one future arrival sits in the heap
        if nxt is not None:
            self._push(max(cast(float, nxt[0].arrival_s), self.now), ARRIVE, nxt)
        if self.concurrency is None or self.active_units < self.concurrency:
            self._start_unit(unit)
        else:
            self.ready.append(unit)

    def _fill_closed(self) -> None:
        limit = self.concurrency or 1
        while self.active_units < limit:
            if self.ready:
                unit = self.ready.popleft()
            else:
                if self.duration_s is not None and self.now >= self.duration_s:
                    self.units_done = True
                unit = self._pull()
                if unit is None:
                    return
            self._start_unit(unit)

    # ---- integrity (tests) ---------------------------------------------------------------------
    def check_idle(self) -> None:
        for w in self.workers:
            w.sched.check_integrity()
            assert w.sched.is_idle(), f"{w.wid} is not idle"
            assert w.bm.is_idle(), f"{w.wid} leaks blocks"
