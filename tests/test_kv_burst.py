"""Disaggregated bursts without a fault must not fail: waiting is not stalling.

One prefill engine and two decode engines in one process, wired through the real connector
halves, on a fake clock where every prefill step takes one second. A burst of long prompts queues
at the prefill worker for far longer than the stall timeout; every transfer must still complete,
none may be failed (and so none re-placed), and the outputs must equal the aggregated engine's.
The KV transfer time the decode side reports must be the time spent moving KV, not the time the
request queued and prefilled (`kv_transfer_gbps`).
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from splitserve.cluster import messages as m
from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv import shm
from splitserve.kv.connector import KVPorts
from splitserve.kv.handoff import HandoffTimeouts
from tests.kv_pair import _engine_kw, tiny  # noqa: F401 (fixture)

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
TIMEOUTS = HandoffTimeouts(stall_s=5.0)  # a prefill step "takes" 1 s: the burst queues for ~60 s


class Cluster:
    """P -> D0, D1; messages are delivered by address, the clock advances 1 s per prefill step."""

    def __init__(self, path, decode_kw=None, direct=True):
        self.now = 0.0
        self.owner = f"burst{uuid.uuid4().hex[:8]}"
        self.queues: list = []

        def ports(name):
            return KVPorts(self.owner, lambda addr, frames: self.queues.append((addr, frames)), reply_to=name,
                           arena_bytes=4 << 20, timeouts=TIMEOUTS, clock=lambda: self.now)

        self.P = LLMEngine(EngineConfig(**_engine_kw(path, max_num_batched_tokens=48)), kv=ports("P"))
        self.D = {}
        for name in ("D0", "D1"):
            seg = shm.segment_name(self.owner, f"{name}-kvcache-1") if direct else None
            self.D[name] = LLMEngine(EngineConfig(**_engine_kw(path, **(decode_kw or {}))), kv_cache_segment=seg,
                                     kv=ports(name))
        self.failures: list = []

    def deliver(self):
        while self.queues:
            addr, frames = self.queues.pop(0)
            msg = m.decode_to_worker(frames[0])
            if addr == "P":
                if isinstance(msg, m.KVRelease):
                    self.P.kv_sender.release(msg.request_id)
                else:
                    self.P.kv_sender.place(msg)
            else:
                payload = tuple(bytes(np.asarray(f)) for f in frames[1:])
                self.failures += self.D[addr].on_kv_message(msg, payload)

    def run(self, prompts, transport="shm"):
        outputs = {}
        for i, prompt in enumerate(prompts):
            rid, dest = f"b{i}", f"D{i % 2}"
            self.D[dest].reserve_kv(rid, prompt, PARAMS, 1, 0, prefill_addr="P", prefill_pid=os.getpid(),
                                    transport=transport)
            self.P.add_prefill_request(rid, prompt, PARAMS, 1, dest, 0, transport)
            outputs[rid] = []
        self.deliver()
        while self.P.has_unfinished() or any(d.has_unfinished() for d in self.D.values()):
            if self.P.has_unfinished():
                for o in self.P.step():
                    outputs[o.request_id].append(o.new_token)
                self.now += 1.0
            self.deliver()
            for d in self.D.values():
                self.failures += d.poll_transfers()
                if d.has_work():
                    for o in d.step():
                        outputs[o.request_id].append(o.new_token)
        return [outputs[f"b{i}"] for i in range(len(prompts))]

    def close(self):
        for e in (self.P, *self.D.values()):
            e.check_integrity()
            assert e.is_idle()
            e.close()
        assert shm.list_segments(self.owner) == []


def _prompts(n, length):
    return [[(7 * i + 3 * j) % 383 + 1 for j in range(length)] for i in range(n)]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_burst_queued_longer_than_the_stall_timeout_all_succeeds(tiny, transport):
    prompts = _prompts(16, 150)  # 2,400 prompt tokens at 48 per step: ~50 s of queue on the fake clock
    reference = LLMEngine(EngineConfig(**_engine_kw(tiny))).generate(prompts, PARAMS)
    c = Cluster(tiny, direct=transport == "shm")
    try:
        assert c.run(prompts, transport) == reference
        assert c.now > 5 * TIMEOUTS.stall_s  # the last requests queued far longer than a stall
        assert c.failures == []  # nothing failed, so the gateway would have re-placed nothing
        assert sum(d.kv_receiver.num_done for d in c.D.values()) == len(prompts)
        assert sum(d.kv_receiver.num_failed for d in c.D.values()) == 0
    finally:
        c.close()


def test_kv_transfer_time_is_the_time_moving_kv_not_queue_and_prefill(tiny):
    """Direct writes happen inside the prefill's forward pass: the transfer time the decode side
    reports (sender copies + landing) must be a part of the prefill steps' time, never more, and
    never the time since the reservation (which includes the whole queue and prefill)."""
    import time

    c = Cluster(tiny)
    try:
        prompts = _prompts(6, 150)
        t0 = time.perf_counter()
        c.run(prompts)
        wall = time.perf_counter() - t0
        moved = sum(d.kv_receiver.transfer_seconds for d in c.D.values())
        received = sum(d.kv_receiver.bytes_received for d in c.D.values())
        assert received == c.P.kv_sender.bytes_sent > 0
        assert 0 < moved < c.P.step_seconds < wall
        # What /metrics shows as splitserve:kv_transfer_gbps: bytes over moving time.
        assert received / moved > received / c.P.step_seconds
    finally:
        c.close()
