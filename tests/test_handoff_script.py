"""One KV handoff for the workers and the simulator: one event script, two drivers, one result.

The script is what a decode worker sees of a handoff: ReserveKV, KV arriving, PrefillDone,
KVStopped, the gateway's abort, the writer's process vanishing, time passing. The live driver feeds
it as messages to a real `LLMEngine` (its DecodeHandoff, KVReceiver and Scheduler); the simulator
driver feeds the same events to a `Simulation`'s decode worker through the simulator's own entry
points (`SimDisaggregation.run`/`tick`). Both must go through the same state sequences, report the
same failures and end with the same requests admitted and the same blocks held.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from array import array

import pytest

from splitserve.bench.workloads import RequestSpec
from splitserve.cluster import messages as m
from splitserve.cluster.messages import FailureReason
from splitserve.cluster.orchestrator import Outcome, RequestOrchestration
from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request import RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv import shm
from splitserve.kv.connector import KVPorts
from splitserve.kv.handoff import Done, HandoffTimeouts, Reserve, RxState, Stopped, WriterGone
from splitserve.sim.hardware import get_link
from splitserve.sim.simulator import PoolSpec, SimConfig, SimRequest, Simulation
from tests.hf_models import write_tiny_model
from tests.sim.test_simulator import cost

BS = 4
BLOCKS = 70  # 280 token slots: two 100-token prompts fit, a third waits for blocks
TIMEOUTS = HandoffTimeouts(stall_s=10.0, queued_s=100.0, stopped_grace_s=2.0, fence_max_s=50.0)
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

# (event, request id, arguments). "reserve": prompt tokens, reused prefix; "chunk": token range
# (every layer); "advance": seconds on the clock, then a poll.
SCRIPT = [
    ("reserve", "big1", 100, 0),
    ("reserve", "big2", 100, 0),
    ("reserve", "late", 100, 0),  # reservation failure: no room yet, retried on every poll
    ("chunk", "early", 0, 40),  # KV before its ReserveKV: the reservation, and so the placement, comes late
    ("reserve", "prefix", 60, 32),  # the prefix the router counted on is not cached: fails
    ("chunk", "big1", 0, 50),
    ("chunk", "big2", 0, 100),
    ("done", "big2"),
    ("advance", "", 0.5),  # big2 complete: admitted
    ("abort", "big1"),  # abort mid-transfer: the writer may still write -> fenced
    ("advance", "", 0.5),  # big1's blocks stay fenced, "late" still waits
    ("stopped", "big1"),  # the writer stops: the fence lifts, "late" gets the blocks
    ("advance", "", 0.5),
    ("chunk", "late", 0, 30),
    ("abort", "late"),  # fenced again
    ("writer_gone", "late"),  # the writer's process died: the fence lifts
    ("reserve", "early", 100, 0),  # its early KV lands at once
    ("chunk", "early", 40, 100),
    ("done", "early"),
    ("advance", "", 0.5),
    ("reserve", "stall", 40, 0),
    ("chunk", "stall", 0, 20),
    ("advance", "", 11.0),  # no KV for longer than stall_s: failed; its writer may write: fenced
    ("stopped", "stall"),
    ("reserve", "queued", 40, 0),
    ("advance", "", 50.0),  # queued at the prefill worker for 50 s: not a stall
    ("chunk", "queued", 0, 40),
    ("done", "queued"),
    ("advance", "", 0.1),
]


def _prompt(rid: str, n: int) -> list[int]:
    base = sum(map(ord, rid)) % 97  # distinct prompts within the tiny model's vocabulary (384)
    return [(base + 3 * i) % 383 + 1 for i in range(n)]


class LiveDriver:
    """A real decode engine; the script arrives as the messages a prefill worker and the gateway send."""

    def __init__(self, model_path: str) -> None:
        self.now = 0.0
        self.cluster = f"script{uuid.uuid4().hex[:8]}"
        self.trace: list = []
        self.sent: list = []
        ports = KVPorts(self.cluster, lambda addr, frames: self.sent.append((addr, frames)), reply_to="D",
                        timeouts=TIMEOUTS, clock=lambda: self.now)
        self.engine = LLMEngine(EngineConfig(model=model_path, dtype="float32", threads=1, max_model_len=256,
                                             block_size=BS, num_kv_blocks=BLOCKS),
                                kv_cache_segment=shm.segment_name(self.cluster, "D-kvcache-1"), kv=ports)
        self.engine.handoff.trace = self.trace
        self.failures: list = []
        k0 = self.engine.runner.kv_caches[0][0]
        self.shape = (len(self.engine.runner.kv_caches), k0.shape[1], k0.shape[2])

    def apply(self, kind: str, rid: str, *args) -> None:
        e = self.engine
        layers, heads, dim = self.shape
        if kind == "reserve":
            self.failures += e.reserve_kv(rid, _prompt(rid, args[0]), PARAMS, 1, args[1], prefill_addr="P",
                                          prefill_pid=os.getpid(), transport="shm")
        elif kind == "chunk":
            hdr = m.KVChunk(rid, 0, args[0], args[1] - args[0], heads, dim, "float32", direct=True,
                            num_layers_covered=layers)
            self.failures += e.on_kv_message(hdr)
        elif kind == "done":
            n = e.handoff.get(rid).request.num_tokens
            self.failures += e.on_kv_message(m.PrefillDone(rid, 7, layers, n))
        elif kind == "stopped":
            self.failures += e.on_kv_message(m.KVStopped(rid))
        elif kind == "abort":
            e.abort_request(rid)
        elif kind == "writer_gone":
            dead = subprocess.Popen(["true"])
            dead.wait()
            e.kv_receiver.landing[rid].writer_pid = dead.pid
            self.failures += e.poll_transfers()
        elif kind == "advance":
            self.now += args[0]
            self.failures += e.poll_transfers()

    def outcome(self) -> dict:
        s = self.engine.scheduler
        return {"admitted": sorted(r.request_id for r in s.kv_ready),
                "held": {rid: len(b) for rid, b in s.block_manager.req_blocks.items()},
                "failures": self.failures}

    def close(self) -> None:
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort_request(rid)
        self.engine.check_integrity()
        assert self.engine.is_idle()
        self.engine.close()
        assert shm.list_segments(self.cluster) == []


class SimDriver:
    """The simulator's decode worker, driven through the simulator's own handoff entry points."""

    def __init__(self) -> None:
        c = cost()
        self.layers = 4
        pools = [PoolSpec("prefill", 1, 1000, c, kv_bytes_per_token=1.0, num_layers=self.layers),
                 PoolSpec("decode", 1, BLOCKS, c, kv_bytes_per_token=1.0, num_layers=self.layers)]
        self.sim = Simulation(SimConfig(max_model_len=256, block_size=BS), pools, link=get_link("ib-ndr"))
        self.trace: list = []
        self.disagg = self.sim.disagg
        self.d = self.sim.decoders[0]
        self.d.handoff.timeouts = TIMEOUTS
        self.d.handoff.trace = self.trace
        self.d.busy = True  # mid-step throughout: an admitted request waits in kv_ready, as in the live engine
        self.failures: list = []

    def apply(self, kind: str, rid: str, *args) -> None:
        d, h, sim = self.d, self.d.handoff, self.sim
        now = sim.now
        if kind == "reserve":
            spec = RequestSpec(rid, args[0], 8, 0.0)
            req = SimRequest(rid, array("q", _prompt(rid, args[0])), PARAMS, spec, 0.0)
            self._run(h.on(Reserve(rid, req, args[1], self.layers, True), now))
        elif kind == "chunk":
            from splitserve.kv.handoff import Chunk

            self._run(h.on(Chunk(rid, 0, self.layers, args[0], args[1] - args[0]), now))
        elif kind == "done":
            self._run(h.on(Done(rid, 7, h.get(rid).request.num_tokens), now))
        elif kind == "stopped":
            self._run(h.on(Stopped(rid), now))
        elif kind == "abort":
            from splitserve.kv.handoff import Abort

            self._run(h.on(Abort(rid), now))
            if not h.is_fenced(rid):
                d.sched.finish(rid)
        elif kind == "writer_gone":
            self._run(h.on(WriterGone(rid), now))
        elif kind == "advance":
            sim.now += args[0]
            self._run(h.tick(sim.now))

    def _run(self, actions) -> None:
        self.failures += self.disagg.run(self.d, actions)

    def outcome(self) -> dict:
        s = self.d.sched
        return {"admitted": sorted(r.request_id for r in s.kv_ready),
                "held": {rid: len(b) for rid, b in s.block_manager.req_blocks.items()},
                "failures": self.failures}


@pytest.fixture(scope="module")
def tiny(tiny_model_root):
    return write_tiny_model(tiny_model_root, "llama")


def test_live_handoff_and_simulator_follow_one_script(tiny):
    live, sim = LiveDriver(tiny), SimDriver()
    try:
        for kind, rid, *args in SCRIPT:
            live.apply(kind, rid, *args)
            sim.apply(kind, rid, *args)
            assert live.trace == sim.trace, f"diverged at {kind} {rid}"
        assert live.outcome() == sim.outcome()
        states = {}
        for rid, state in live.trace:
            states.setdefault(rid, []).append(state)
        S = RxState
        assert states["late"] == [S.RESERVING, S.PLACED, S.LANDING, S.FENCED, S.DROPPED]
        assert states["prefix"] == [S.RESERVING, S.FAILED]
        assert states["big1"] == [S.RESERVING, S.PLACED, S.LANDING, S.FENCED, S.DROPPED]
        assert states["big2"] == [S.RESERVING, S.PLACED, S.LANDING, S.READY]
        assert states["early"] == [S.RESERVING, S.LANDING, S.READY]
        assert states["stall"] == [S.RESERVING, S.PLACED, S.LANDING, S.FENCED, S.FAILED]
        assert states["queued"] == [S.RESERVING, S.PLACED, S.LANDING, S.READY]
        assert live.failures == [("prefix", FailureReason.PREFIX_EVICTED), ("stall", FailureReason.TRANSFER_STALLED)]
        assert live.outcome()["admitted"] == ["big2", "early", "queued"]
        # Every transfer that got blocks offered them to its same-host writer (KVPlacement).
        offered = sorted(m.decode_to_worker(frames[0]).request_id for _, frames in live.sent)
        assert offered == ["big1", "big2", "early", "late", "queued", "stall"]
        # The gateway's policy on those reasons: place again, without the prefix that vanished.
        for rid, reason in live.failures:
            orch = RequestOrchestration(rid)
            orch.plan(_placement(), BS)
            decision = orch.on_failure(reason)
            assert decision.outcome is Outcome.RETRY and not decision.reuse_prefix
    finally:
        live.close()


def _placement():
    from splitserve.cluster.router import Placement

    return Placement("decode-0", "prefill-0", 32, 0)


def test_orchestrator_reasons_and_attempt_budget():
    orch = RequestOrchestration("r", max_attempts=3)
    plan = orch.plan(_placement(), 16)
    assert (plan.sub_id, plan.reuse_tokens, plan.resumed) == ("r@1", 32, False)
    assert orch.on_failure(FailureReason.WORKER_DIED).reuse_prefix  # the decode cache is intact
    plan = orch.plan(_placement(), 16)
    assert (plan.sub_id, plan.reuse_tokens, plan.resumed) == ("r@2", 32, True)  # ahead of new requests
    assert not orch.on_failure(FailureReason.PREFIX_EVICTED).reuse_prefix
    assert orch.plan(_placement(), 16).reuse_tokens == 0
    assert orch.on_failure(FailureReason.TRANSFER_STALLED).outcome is Outcome.UNAVAILABLE  # 3 placements spent
    assert RequestOrchestration("x").on_failure(FailureReason.INVALID).outcome is Outcome.CLIENT_ERROR
    assert RequestOrchestration("y").on_failure(FailureReason.QUEUE_FULL).outcome is Outcome.UNAVAILABLE


def test_failure_reason_travels_as_an_enum():
    msg = m.RequestError("r", "whatever text", "decode-0", FailureReason.PREFIX_EVICTED)
    assert m.decode_from_worker(m.encode(msg)).reason is FailureReason.PREFIX_EVICTED


def test_resumed_request_goes_ahead_of_the_queue():
    from splitserve.config import SchedulerConfig
    from splitserve.engine.request import Request
    from splitserve.engine.scheduler import QueueFull, Scheduler

    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_waiting=2, num_blocks=200, block_size=4, max_model_len=64))
    for i in range(3):
        s.add_request(Request(f"n{i}", [1, 2, 3], PARAMS))
    with pytest.raises(QueueFull):
        s.add_request(Request("n3", [1, 2, 3], PARAMS))
    s.add_request(Request("again", [1, 2, 3], PARAMS), resumed=True)  # admitted already: past the bound
    assert [r.request_id for r in s.waiting] == ["again", "n0", "n1", "n2"]
    for rid in list(s.requests):
        s.finish(rid, RequestStatus.FINISHED_ABORTED)
    assert s.is_idle()
