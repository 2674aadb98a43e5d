"""The in-process KV handoff harness: a prefill engine wired to a decode engine through the real
connector halves, on a fake clock, and the fixtures the KV tests share."""

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
from tests.hf_models import write_tiny_model
from tests.test_model_vs_hf import prompts_for

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _engine_kw(path, **kw) -> dict:
    cfg = dict(model=path, dtype="float32", threads=2, max_model_len=256, block_size=4, num_kv_blocks=400)
    cfg.update(kw)
    return cfg


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(**_engine_kw(path, **kw)))


class Pair:
    """A prefill engine wired to a decode engine through the real connector halves.

    `direct`: the decode engine's KV cache lives in shared memory and the prefill engine writes
    into it after a KVPlacement (same-host workers). `hold_placements`: placements reach the
    prefill side only after its first step, so that step goes through the arena."""

    live: list["Pair"] = []

    def __init__(self, path, p_kw=None, d_kw=None, transport="shm", arena_bytes=1 << 20, direct=False,
                 hold_placements=False, timeouts=HandoffTimeouts()):
        """transport "tcp-data": TCP on the raw data channel (real loopback sockets). Both engines
        run on a fake clock (`self.now`), advanced by hand."""
        self.cluster = f"test{uuid.uuid4().hex[:8]}"
        self.now = 0.0
        data = transport == "tcp-data"

        def ports(name, data_host=None):
            return KVPorts(self.cluster, self._deliver, reply_to=name, arena_bytes=arena_bytes, secret=b"s3cret",
                           data_host=data_host, timeouts=timeouts, clock=lambda: self.now)

        self.P = LLMEngine(EngineConfig(**_engine_kw(path, **(p_kw or {}))), kv=ports("P"))
        segment = shm.segment_name(self.cluster, "D-kvcache-1") if direct else None
        self.D = LLMEngine(EngineConfig(**_engine_kw(path, **(d_kw or {}))), kv_cache_segment=segment,
                           kv=ports("D", "127.0.0.1" if data else None))
        self.transport = "tcp" if data else transport
        self.direct = direct
        self.failures = []
        self.data_addr = self.D.kv_receiver.data.address if data else ""
        self.in_flight: list[tuple[str, list]] = []
        self.hold_placements = hold_placements
        self.held: list = []
        Pair.live.append(self)

    def _deliver(self, addr, frames):
        payload = tuple(bytes(np.asarray(f)) for f in frames[1:])
        msg = m.decode_to_worker(frames[0])
        if isinstance(msg, m.KVRelease):
            self.P.kv_sender.release(msg.request_id)
        elif isinstance(msg, m.KVPlacement):
            if self.hold_placements:
                self.held.append(msg)
            else:
                self.P.kv_sender.place(msg)
        else:
            self.in_flight.append((msg, payload))

    def release_placements(self):
        for msg in self.held:
            self.P.kv_sender.place(msg)
        self.held.clear()

    def pump_data(self):
        """Move what sits in the data sockets (queued sends, unread bytes) until both are empty."""
        import select

        rx = self.D.kv_receiver.data
        if rx is None:
            return
        for _ in range(100_000):
            self.P.kv_sender.flush_data()
            readable, _, _ = select.select(rx.fds(), [], [], 0.02)
            for fd in readable:
                rx.pump(fd)
            if not readable and not self.P.kv_sender.data_waiting() and not rx.mid_chunk:
                return
        raise AssertionError("data channel never went quiet")

    def flush(self):
        self.pump_data()
        for msg, payload in self.in_flight:
            self.failures += self.D.on_kv_message(msg, payload)
        self.in_flight.clear()

    def reserve(self, rid, prompt, params, seed=11, reuse_tokens=0):
        self.D.reserve_kv(rid, prompt, params, seed=seed, reuse_tokens=reuse_tokens, prefill_addr="P",
                          prefill_pid=os.getpid(), transport=self.transport)

    def generate(self, prompts, params, reuse=None, reserve_late=False):
        ids = [f"r{i}-{uuid.uuid4().hex[:6]}" for i in range(len(prompts))]
        outputs = {rid: [] for rid in ids}
        for rid, p in zip(ids, prompts):
            send_from = reuse(p) if reuse else 0
            if not reserve_late:
                self.reserve(rid, p, params, reuse_tokens=send_from)
            self.P.add_prefill_request(rid, p, params, 11, "D", send_from, self.transport, data_addr=self.data_addr,
                                       dest_pid=os.getpid())
        while self.P.has_unfinished():
            for o in self.P.step():
                outputs[o.request_id].append(o.new_token)
                assert o.remote or o.finish_reason
            self.release_placements()
        if reserve_late:  # chunks and the done notice arrive before the reservation
            self.flush()
            for rid, p in zip(ids, prompts):
                self.reserve(rid, p, params)
        self.flush()
        while self.D.has_unfinished():
            assert not self.D.poll_transfers()
            for o in self.D.step():
                outputs[o.request_id].append(o.new_token)
        return [outputs[r] for r in ids]

    def assert_clean(self):
        for e in (self.P, self.D):
            e.check_integrity()
            assert e.is_idle()
        assert shm.list_segments(self.cluster, arenas=False) == []
        assert not self.P.kv_sender.early_placements and not self.D.handoff.fenced()
        self.close()
        assert shm.list_segments(self.cluster) == []

    def close(self):
        self.P.close()
        self.D.close()


@pytest.fixture(autouse=True)
def no_leftover_shared_memory():
    """Whatever a test does, it must not leave a segment behind (closing its pairs removes arenas
    and the shared KV caches)."""
    Pair.live = []
    yield
    for pair in Pair.live:
        pair.close()
        assert shm.list_segments(pair.cluster) == []


@pytest.fixture(scope="module")
def tiny(tiny_model_root):
    return write_tiny_model(tiny_model_root, "llama")


@pytest.fixture(scope="module")
def expected(tiny):
    return engine(tiny).generate(prompts_for(384), GREEDY)
