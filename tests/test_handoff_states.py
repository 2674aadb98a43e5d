"""The decode side's handoff state machine alone, on a fake clock, with the real (pure) Scheduler."""

from __future__ import annotations

from splitserve.cluster.messages import FailureReason
from splitserve.config import SchedulerConfig
from splitserve.engine.request import Request
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler
from splitserve.kv.handoff import (Abort, Act, Chunk, DecodeHandoff, Done, HandoffTimeouts, Reserve, Reserved, RxState,
                                   Stopped, apply_scheduler_actions)

TO = HandoffTimeouts(stall_s=10.0, queued_s=100.0, stopped_grace_s=2.0, early_ttl_s=5.0, tombstone_s=5.0,
                     fence_max_s=20.0)
LAYERS = 2
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


class Harness:
    def __init__(self, num_blocks=20):
        self.sched = Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=4, max_model_len=64))
        self.trace: list = []
        self.h = DecodeHandoff(TO, self.trace)
        self.rest: list = []

    def on(self, event, now):
        self.rest += apply_scheduler_actions(self.sched, self.h, self.h.on(event, now), now)

    def tick(self, now):
        self.rest += apply_scheduler_actions(self.sched, self.h, self.h.tick(now), now)

    def reserve(self, rid, n, now=0.0, writer=True, reuse=0):
        self.on(Reserve(rid, Request(rid, list(range(1, n + 1)), PARAMS), reuse, LAYERS, writer), now)

    def kinds(self, rid):
        return [a.kind for a in self.rest if a.request_id == rid]

    def failures(self):
        return [(a.request_id, a.arg) for a in self.rest if a.kind is Act.REPORT_FAILURE]

    def states(self, rid):
        return [s for r, s in self.trace if r == rid]


def test_a_queued_prefill_is_not_a_stall_but_a_stalled_one_is():
    t = Harness()
    t.reserve("q", 12)
    t.tick(99.0)  # queued at the prefill worker: no KV yet, within the leak bound
    assert t.h.state("q") is RxState.PLACED and not t.failures()
    t.on(Chunk("q", 0, LAYERS, 0, 4), 99.0)
    t.tick(108.0)
    assert not t.failures()
    t.tick(109.5)  # 10.5 s since the last KV
    assert t.failures() == [("q", FailureReason.TRANSFER_STALLED)]
    assert t.h.state("q") is RxState.FENCED  # the writer had a placement and never said it ended
    t.on(Stopped("q"), 110.0)
    assert t.h.state("q") is RxState.FAILED and t.sched.block_manager.is_idle()


def test_kv_all_in_waits_for_blocks_as_long_as_it_takes():
    t = Harness(num_blocks=16)  # 64 slots
    t.reserve("big", 60)
    t.on(Chunk("big", 0, LAYERS, 0, 60), 1.0)
    t.on(Done("big", 7, 60), 1.0)
    t.tick(1.0)  # admitted: decodes, holding its blocks
    t.reserve("wait", 12, writer=False, now=1.0)
    t.on(Chunk("wait", 0, LAYERS, 0, 12), 1.0)
    t.on(Done("wait", 7, 12), 1.0)
    t.tick(1000.0)  # all its KV in, no blocks: queueing, not failing
    assert t.h.state("wait") is RxState.RESERVING and not t.failures()
    t.sched.finish("big")  # big's decode ends: blocks free
    t.tick(1000.5)
    t.tick(1001.0)
    assert t.states("wait") == [RxState.RESERVING, RxState.LANDING, RxState.READY]
    assert t.sched.kv_ready[0].request_id == "wait" and t.sched.kv_ready[0].token_ids[-1] == 7


def test_writer_stopped_without_finishing_fails_after_the_grace():
    t = Harness()
    t.reserve("s", 12)
    t.on(Chunk("s", 0, LAYERS, 0, 4), 0.0)
    t.on(Stopped("s"), 1.0)
    t.tick(2.5)
    assert not t.failures()
    t.tick(3.5)
    assert t.failures() == [("s", FailureReason.WRITER_STOPPED)]
    assert t.h.state("s") is RxState.FAILED and t.sched.block_manager.is_idle()  # it ended: no fence


def test_a_hole_or_a_short_prefill_loses_kv():
    t = Harness()
    t.reserve("hole", 12, writer=False)
    t.on(Chunk("hole", 0, 1, 4, 4), 0.0)  # tokens [0, 4) of layer 0 never came
    t.reserve("short", 12, writer=False)
    t.on(Chunk("short", 0, LAYERS, 0, 8), 0.0)
    t.on(Done("short", 7, 8), 0.0)  # covers 8 of 12 tokens
    t.tick(0.1)
    assert sorted(t.failures()) == [("hole", FailureReason.KV_LOST), ("short", FailureReason.KV_LOST)]
    assert t.sched.block_manager.is_idle()


def test_early_kv_past_a_reused_prefix_is_not_a_hole():
    """KV that beats the ReserveKV starts past the decode side's cached prefix (the writer skips
    it): a fresh prefill worker's first transfers to an older decode worker failed as kv_lost."""
    h = DecodeHandoff(TO)
    req = Request("r", list(range(1, 13)), PARAMS)
    h.on(Chunk("r", 0, LAYERS, 8, 4), 0.0)  # tokens [8, 12), before the reservation
    h.on(Reserve("r", req, 8, LAYERS), 0.1)
    h.on(Reserved("r", True), 0.1)
    h.on(Done("r", 5, 12), 0.2)
    acts = h.tick(0.3)
    assert [a.kind for a in acts] == [Act.ADMIT, Act.RELEASE_SOURCE] and h.num_failed == 0
    # ... and early KV that starts past the reused prefix is still a hole
    h.on(Chunk("s", 0, LAYERS, 8, 4), 1.0)
    h.on(Reserve("s", Request("s", list(range(1, 13)), PARAMS), 4, LAYERS), 1.1)
    h.on(Reserved("s", True), 1.1)
    h.on(Done("s", 5, 12), 1.2)
    assert (Act.REPORT_FAILURE, FailureReason.KV_LOST) in [(a.kind, a.arg) for a in h.tick(1.3)]


def test_early_kv_expires_and_late_kv_for_a_dropped_transfer_is_discarded():
    t = Harness()
    t.on(Chunk("e", 0, LAYERS, 0, 4), 0.0)
    assert t.h.state("e") is RxState.EARLY and t.h.busy
    t.tick(5.5)
    assert t.h.state("e") is None and t.kinds("e")[-1] is Act.RELEASE_SOURCE
    t.on(Abort("gone"), 6.0)  # the gateway gave up before any KV came
    assert t.h.on(Chunk("gone", 0, LAYERS, 0, 4), 7.0)[0].kind is Act.DISCARD
    assert not t.h.busy  # a tombstone is not work
    t.tick(11.5)
    assert t.h.state("gone") is None


def test_a_fence_on_a_silent_live_writer_is_lifted_loudly():
    t = Harness()
    t.reserve("f", 12)
    t.on(Abort("f"), 1.0)
    t.tick(20.5)
    assert t.h.is_fenced("f") and not t.sched.block_manager.is_idle()
    t.tick(21.5)
    forced = [a for a in t.rest if a.kind is Act.FREE_BLOCKS and a.request_id == "f"]
    assert forced and forced[-1].arg is True and t.sched.block_manager.is_idle()


def test_a_vanished_prefix_fails_at_once_and_counts_one_query():
    t = Harness()
    t.reserve("p", 20, reuse=8)
    assert t.failures() == [("p", FailureReason.PREFIX_EVICTED)]
    assert t.sched.block_manager.num_queried_tokens == 20  # once, not once per lookup


def test_by_default_no_queue_is_too_long():
    """A burst on a slow machine queued one prefill for 900 s (benchmarks/disagg_burst.py): with
    the default timeouts waiting for the prefill to start never fails a transfer."""
    t = Harness()
    t.h = DecodeHandoff(HandoffTimeouts(), t.trace)
    t.reserve("slow", 12)
    t.tick(10.0 ** 6)
    assert not t.failures() and t.h.state("slow") is RxState.PLACED
    t.on(Chunk("slow", 0, LAYERS, 0, 12), 10.0 ** 6)
    t.on(Done("slow", 7, 12), 10.0 ** 6)
    t.tick(10.0 ** 6 + 1)
    assert t.h.state("slow") is None and t.sched.kv_ready[0].request_id == "slow"
