"""The simulator's disaggregated path: the live gateway's orchestration and the live decode side's
KV handoff, on a virtual clock, with a link model where a worker has a transport.

Per request, as the gateway does it: the router places it; `RequestOrchestration` plans the attempt
(prefix reuse, `resumed` after a fault); the decode worker's `DecodeHandoff` gets the reservation
(ReserveKV) while the prefill worker queues the prompt (PrefillRequest). The link model delivers the
KV: the first layer when the ingress link has carried 1/L of it, the rest when all of it has
landed. A failure the handoff reports goes back to the orchestrator, which places the request again
or answers 503/400, exactly as live. Nothing here decides policy: it moves events between the live
objects and charges the link's time.

Decode backpressure (`cluster/admission.py`, the gateway's policy): a new request is placed only
when some decode worker has a seat and KV for it; otherwise it waits in the gateway's bounded FIFO
(503 beyond) and is placed when a decode worker's load report shows room.
"""

from __future__ import annotations

from typing import Any

from splitserve.cluster.admission import AdmissionConfig, DecodeAdmission, Verdict
from splitserve.cluster.messages import FailureReason
from splitserve.cluster.orchestrator import Outcome, RequestOrchestration
from splitserve.cluster.router import NoWorkerAvailable, Placement, Router
from splitserve.engine.request import RequestStatus
from splitserve.engine.scheduler import QueueFull
from splitserve.kv.handoff import (Abort, Act, Chunk, DecodeHandoff, Done, HandoffTimeouts, Reserve, Stopped,
                                   apply_scheduler_actions)
from splitserve.sim.state import FAKE_TOKEN, KV, SimRequest, SimWorker


class SimDisaggregation:
    """Placement, retries and KV handoff of one Simulation (`sim`)."""

    def __init__(self, sim: Any, timeouts: HandoffTimeouts = HandoffTimeouts(), trace: list | None = None,
                 admission: AdmissionConfig = AdmissionConfig()) -> None:
        self.sim = sim
        self.timeouts = timeouts
        self.trace = trace  # handoff state changes of every decode worker, (request id, state)
        self.num_replaced = 0
        for w in sim.decoders:
            w.handoff = DecodeHandoff(timeouts, trace)
            w.view.max_running = sim.cfg.max_num_seqs
        # Backpressure only where a prefill pool could run ahead of the decode pool.
        self.admission = DecodeAdmission(admission) if sim.disaggregated and admission.enabled else None
        self.waiting: dict[str, SimRequest] = {}  # request id -> request queued at the gateway

    # ---- admission (the gateway's queue in front of prefill) -------------------------------------
    def submit(self, req: SimRequest) -> None:
        adm = self.admission
        if adm is None:
            self.place(req)
            return
        verdict = adm.offer(req.request_id, req.num_tokens, req.sampling_params.max_tokens,
                            self.sim.router.workers.values(), self.sim.now)
        if verdict is Verdict.ADMIT:
            self.place(req)
        elif verdict is Verdict.QUEUED:
            self.waiting[req.request_id] = req
        else:
            self.sim._fail(req, "http_503", "the gateway queue is full; retry later")

    def release(self) -> None:
        """Place queued requests, oldest first, while a decode worker can take the next one."""
        adm = self.admission
        if adm is None or not self.waiting:
            return
        views = self.sim.router.workers.values()
        while (rid := adm.pop_ready(views)) is not None:
            self.place(self.waiting.pop(rid))  # accounts it (Router.on_dispatch) before the next check

    # ---- placement (the gateway's _dispatch) ---------------------------------------------------
    def place(self, req: SimRequest) -> None:
        sim = self.sim
        if req.orch is None:
            req.orch = RequestOrchestration(req.request_id)
        try:
            placement = self._route(req)
        except NoWorkerAvailable as exc:
            sim._fail(req, "http_503", str(exc))
            return
        d = sim.by_id[placement.decode_worker]
        plan = req.orch.plan(placement, d.bm.block_size)
        if not req.orch.reuse_prefix:
            placement = Placement(placement.decode_worker, placement.prefill_worker, 0, 0)
        sim.router.on_dispatch(placement, req.num_tokens)
        req.worker = d
        if plan.prefill_worker is None:
            try:
                d.sched.add_request(req, plan.resumed)
            except QueueFull:
                self.failed(req, FailureReason.QUEUE_FULL)
                return
            sim._wake(d)
            return
        req.kv_cached = plan.reuse_tokens
        p = sim.by_id[plan.prefill_worker]
        twin = SimRequest(req.request_id, req.prompt_token_ids, req.sampling_params, req.spec, req.t_arrival,
                          prefill_only=True, output_token_ids=req.output_token_ids)
        twin.client = req
        twin.worker = p
        req.peer = twin
        now = sim.now
        failures = self.run(d, d.handoff.on(Reserve(req.request_id, req, plan.reuse_tokens, sim.num_layers, True), now))
        try:
            p.sched.add_request(twin, plan.resumed)
        except QueueFull:
            failures.append((req.request_id, FailureReason.QUEUE_FULL))
        else:
            p.tokens += req.num_tokens
            sim._wake(p)
        self.report(d, failures)

    def _route(self, req: SimRequest) -> Placement:
        sim = self.sim
        router: Router = sim.router
        if len(sim.workers) <= sim.cfg.router_sample:
            return router.place(req.token_ids)
        k = sim.cfg.router_sample  # power-of-k choices over the real policy
        cand = Router(router.config)
        for w in sim.rng.sample(sim.decoders, min(k, len(sim.decoders))):
            cand.workers[w.wid] = w.view
        if sim.prefillers:
            for w in sim.rng.sample(sim.prefillers, min(k, len(sim.prefillers))):
                cand.workers[w.wid] = w.view
        return cand.place(req.token_ids)

    # ---- the handoff's events --------------------------------------------------------------------
    def run(self, d: SimWorker, actions: list) -> list[tuple[str, FailureReason]]:
        """Carry out the handoff's actions on the decode worker `d`; returns failures to report."""
        failures = []
        for a in apply_scheduler_actions(d.sched, d.handoff, actions, self.sim.now):
            if a.kind is Act.ADMIT:
                self.sim._wake(d)
            elif a.kind is Act.REPORT_FAILURE:
                failures.append((a.request_id, a.arg))
        return failures  # placements, landing and source memory have no cost on the link model

    def tick(self, d: SimWorker) -> None:
        if d.handoff.transfers:
            self.report(d, self.run(d, d.handoff.tick(self.sim.now)))
        self.release()  # its load report may show room for the head of the gateway queue

    def prefill_done(self, twin: SimRequest) -> None:
        """The prefill worker sampled a token: the client sees it now. PrefillDone goes to the decode
        worker; the KV lands as the ingress link delivers it (overlapped with the prefill)."""
        sim = self.sim
        req: SimRequest = twin.client
        now = sim.now
        if req.t_first < 0:
            req.t_first = now
        req.t_last = now
        if req.times is not None:
            req.times.append(now)
        d: SimWorker = req.worker
        rid = req.request_id
        if twin.status != RequestStatus.FINISHED_REMOTE:  # done at the prefill (max_tokens reached)
            self.run(d, d.handoff.on(Stopped(rid), now) + d.handoff.on(Abort(rid), now))
            req.append_token(FAKE_TOKEN)
            sim._finish(req)
            self.tick(d)
            return
        self.run(d, d.handoff.on(Done(rid, FAKE_TOKEN, req.num_tokens), now))
        link = sim.link
        xfer = (req.num_tokens - req.kv_cached) * sim.kv_bytes_per_token / link.bandwidth
        start = twin.t_prefill_start if twin.t_prefill_start >= 0 else now
        # Layers leave as the prefill computes them; the last layer of the last chunk leaves at the
        # end. The decode worker's ingress link carries one transfer at a time.
        last_layer = xfer / sim.num_layers
        begin = max(start, d.link_free_at)
        land = max(begin + xfer, now + last_layer) + link.latency_s
        d.link_free_at = land - link.latency_s
        sim._push(land, KV, req)

    def kv_landed(self, req: SimRequest) -> None:
        d: SimWorker = req.worker
        n = req.num_tokens - req.kv_cached
        self.run(d, d.handoff.on(Chunk(req.request_id, 0, self.sim.num_layers, req.kv_cached, n), self.sim.now))
        self.tick(d)

    # ---- failures (the gateway's retry policy) ----------------------------------------------------
    def report(self, d: SimWorker, failures: list[tuple[str, FailureReason]]) -> None:
        for rid, reason in failures:
            t = d.handoff.get(rid)
            if t is not None and t.request is not None:
                self.failed(t.request, reason)

    def failed(self, req: SimRequest, reason: FailureReason) -> None:
        """Abort the attempt everywhere (decode side first, then the prefill side, whose KVStopped
        follows), then let the orchestrator decide."""
        sim = self.sim
        d: SimWorker = req.worker
        rid = req.request_id
        now = sim.now
        if d.handoff is not None:
            self.run(d, d.handoff.on(Abort(rid), now))
        if d.handoff is None or not d.handoff.is_fenced(rid):
            d.sched.finish(rid)  # a fenced reservation stays until the writer stops (next)
        twin = req.peer
        if twin is not None:
            twin.worker.sched.finish(rid)
            self.run(d, d.handoff.on(Stopped(rid), now))  # the prefill side's KVStopped
        decision = req.orch.on_failure(reason)
        if decision.outcome is Outcome.RETRY:
            self.num_replaced += 1
            self.place(self._next_attempt(req))
        else:
            status = "http_400" if decision.outcome is Outcome.CLIENT_ERROR else "http_503"
            sim._fail(req, status, f"request failed ({reason.value})")

    def _next_attempt(self, req: SimRequest) -> SimRequest:
        """The request again, with the tokens its client has seen as output (as the gateway sends)."""
        seen = len(req.times) if req.times is not None else (1 if req.t_first >= 0 else 0)
        nxt = SimRequest(f"{req.spec.request_id}@{req.orch.attempts + 1}", req.prompt_token_ids, req.sampling_params,
                         req.spec, req.t_arrival, output_token_ids=[FAKE_TOKEN] * seen)
        nxt.times, nxt.t_first, nxt.t_last = req.times, req.t_first, req.t_last
        nxt.client, nxt.orch = req.client, req.orch
        return nxt
