"""What the simulator keeps per request and per worker."""

from __future__ import annotations

from array import array
from typing import Any

from splitserve.bench.workloads import RequestSpec
from splitserve.engine.request import Request
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler
from splitserve.sim.cost import StepCost

FAKE_TOKEN = 1  # every simulated sample draws this token (ignore_eos: never stops early)
# Heap event kinds (ties in time break by sequence number: FIFO).
STEP, ARRIVE, KV, ADD = 0, 1, 2, 3


class SimRequest(Request):
    """The engine's Request plus the client-side timestamps the simulator records."""

    __slots__ = ("spec", "t_arrival", "t_first", "t_last", "times", "worker", "peer", "t_prefill_start",
                 "client", "kv_cached", "orch")

    def __init__(self, request_id: str, prompt_token_ids: array, params: SamplingParams, spec: RequestSpec,
                 t_arrival: float, prefill_only: bool = False, output_token_ids: Any = None) -> None:
        super().__init__(request_id, prompt_token_ids, params, prefill_only=prefill_only,
                         output_token_ids=output_token_ids)
        self.spec = spec
        self.t_arrival = t_arrival
        self.t_first = -1.0
        self.t_last = -1.0
        # With ITLs recorded: the time of every token the client saw (the first is t_first);
        # gaps are taken at the end. Without: only t_first and t_last are kept.
        self.times: Any = None  # array("d") or None
        self.worker: Any = None  # its SimWorker
        self.peer: Any = None  # disaggregated: the request's twin on the other pool
        self.t_prefill_start = -1.0
        self.client: Any = None  # the client-facing request (prefill twin -> decode twin share one)
        self.kv_cached = 0  # decode side: prompt tokens reused from its prefix cache (not shipped)
        self.orch: Any = None  # disaggregated: the request's RequestOrchestration (attempts, retries)


class SimWorker:
    __slots__ = ("wid", "role", "sched", "bm", "cost", "busy", "plan", "steps", "busy_s", "decode_steps",
                 "decode_busy_s", "view", "link_free_at", "handoff", "tokens", "neighbors", "neighbor")

    def __init__(self, wid: str, role: str, sched: Scheduler, cost: StepCost) -> None:
        self.wid = wid
        self.role = role
        self.sched = sched
        self.bm = sched.block_manager
        self.cost = cost
        self.busy = False
        self.plan: Any = None  # the StepPlan in flight
        self.steps = 0
        self.busy_s = 0.0
        self.decode_steps = 0  # steps whose every chunk is one token, and their busy time
        self.decode_busy_s = 0.0
        self.view: Any = None  # its WorkerView, when there is a router
        self.link_free_at = 0.0  # decode workers: ingress link busy until
        self.handoff: Any = None  # decode workers of a disaggregated deployment: their DecodeHandoff
        self.tokens = 0
        # local-cpu workers share this host: a step runs (1 + factor) longer while another computes
        self.neighbors: list[SimWorker] = []
        self.neighbor: tuple[float, float] | None = None  # (decode, prefill) factors
