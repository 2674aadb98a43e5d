"""Prefill engine -> KV connector -> decode engine, in one process: identical to aggregated output."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from splitserve.cluster import messages as m
from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv import shm
from splitserve.kv.connector import KVReceiver, KVSender
from tests.hf_models import write_tiny_model
from tests.test_model_vs_hf import prompts_for

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def engine(path, **kw) -> LLMEngine:
    cfg = dict(model=path, dtype="float32", threads=2, max_model_len=256, block_size=4, num_kv_blocks=400)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


class Pair:
    """A prefill engine wired to a decode engine through the real connector halves."""

    live: list["Pair"] = []

    def __init__(self, path, p_kw=None, d_kw=None, transport="shm", arena_bytes=1 << 20):
        self.cluster = f"test{uuid.uuid4().hex[:8]}"
        self.P = engine(path, **(p_kw or {}))
        self.D = engine(path, **(d_kw or {}))
        self.transport = transport
        self.P.kv_sender = KVSender(self.cluster, self.P.runner.kv_caches, self.P.config.block_size, self._deliver,
                                    reply_to="P", arena_bytes=arena_bytes)
        self.D.kv_receiver = KVReceiver(self.D.scheduler, self.D.runner.kv_caches, self.D.config.block_size,
                                        send=self._deliver)
        self.in_flight: list[tuple[str, list]] = []
        Pair.live.append(self)

    def _deliver(self, addr, frames):
        payload = tuple(bytes(np.asarray(f)) for f in frames[1:])
        msg = m.decode_to_worker(frames[0])
        if isinstance(msg, m.KVRelease):
            self.P.kv_sender.release(msg.request_id)
        else:
            self.in_flight.append((msg, payload))

    def flush(self):
        for msg, payload in self.in_flight:
            if isinstance(msg, m.KVChunk):
                self.D.kv_receiver.on_chunk(msg, payload)
            else:
                self.D.kv_receiver.on_done(msg)
        self.in_flight.clear()

    def generate(self, prompts, params, reuse=None, reserve_late=False):
        ids = [f"r{i}-{uuid.uuid4().hex[:6]}" for i in range(len(prompts))]
        outputs = {rid: [] for rid in ids}
        for rid, p in zip(ids, prompts):
            send_from = reuse(p) if reuse else 0
            if not reserve_late:
                self.D.reserve_kv(rid, p, params, seed=11, reuse_tokens=send_from)
            self.P.add_prefill_request(rid, p, params, 11, "D", send_from, self.transport)
        while self.P.has_unfinished():
            for o in self.P.step():
                outputs[o.request_id].append(o.new_token)
                assert o.remote or o.finish_reason
        if reserve_late:  # chunks and the done notice arrive before the reservation
            self.flush()
            for rid, p in zip(ids, prompts):
                self.D.reserve_kv(rid, p, params, seed=11, reuse_tokens=0)
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
        self.P.kv_sender.close()
        self.D.kv_receiver.close()
        assert shm.list_segments(self.cluster) == []


@pytest.fixture(autouse=True)
def no_leftover_shared_memory():
    """Whatever a test does, it must not leave a segment behind (closing its pairs removes arenas)."""
    Pair.live = []
    yield
    for pair in Pair.live:
        pair.P.kv_sender.close()
        pair.D.kv_receiver.close()
        assert shm.list_segments(pair.cluster) == []


@pytest.fixture(scope="module")
def tiny(tiny_model_root):
    return write_tiny_model(tiny_model_root, "llama")


@pytest.fixture(scope="module")
def expected(tiny):
    return engine(tiny).generate(prompts_for(384), GREEDY)


@pytest.mark.parametrize("transport,arena", [("shm", 1 << 20), ("shm", 0), ("shm", 4096), ("tcp", 0)])
def test_handoff_matches_aggregated(tiny, expected, transport, arena):
    """Arena of 1 MiB (regions reused), none (one-off segments), 4 KiB (mostly overflowing), TCP frames."""
    pair = Pair(tiny, transport=transport, arena_bytes=arena)
    assert pair.generate(prompts_for(384), GREEDY) == expected
    assert pair.D.kv_receiver.num_done == len(expected)
    pair.assert_clean()


def test_different_block_sizes_and_chunked_prefill(tiny, expected):
    pair = Pair(tiny, p_kw=dict(block_size=16, max_num_batched_tokens=24), d_kw=dict(block_size=4))
    assert pair.generate(prompts_for(384), GREEDY) == expected
    pair.assert_clean()


def test_chunks_arriving_before_the_reservation(tiny, expected):
    pair = Pair(tiny)
    assert pair.generate(prompts_for(384), GREEDY, reserve_late=True) == expected
    pair.assert_clean()


def test_decode_side_prefix_reuse_moves_only_new_kv(tiny):
    pair = Pair(tiny)
    base = prompts_for(384)[-1]  # 100 tokens
    turn2 = base + prompts_for(384, seed=3)[3]
    ref = engine(tiny).generate([base, turn2], GREEDY)
    # Turn 1 runs on the decode worker itself (local prefill), which caches its blocks.
    assert pair.D.generate([base], GREEDY) == ref[:1]
    sent_before = pair.P.kv_sender.bytes_sent
    got = pair.generate([turn2], GREEDY, reuse=lambda p: 96)
    assert got == ref[1:]
    sender = pair.P.kv_sender
    moved_tokens = (sender.bytes_sent - sent_before) // (sender.token_bytes * sender.num_layers)
    assert moved_tokens == len(turn2) - 96
    pair.assert_clean()


def test_seeded_sampling_matches_aggregated(tiny):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, ignore_eos=True)
    prompts = prompts_for(384)[:3]
    agg = engine(tiny)
    ref = []
    for i, p in enumerate(prompts):
        rid = f"a{i}"
        agg.add_request(rid, p, params, seed=11)
    outs = {}
    while agg.has_unfinished():
        for o in agg.step():
            outs.setdefault(o.request_id, []).append(o.new_token)
    ref = [outs[f"a{i}"] for i in range(3)]
    pair = Pair(tiny)
    assert pair.generate(prompts, params) == ref
    pair.assert_clean()


def test_abort_mid_transfer_frees_both_sides(tiny):
    pair = Pair(tiny, p_kw=dict(max_num_batched_tokens=16))
    p = prompts_for(384)[-1]
    pair.D.reserve_kv("x", p, GREEDY, seed=1, reuse_tokens=0)
    pair.P.add_prefill_request("x", p, GREEDY, 1, "D", 0, "shm")
    pair.P.step()
    pair.P.step()  # two chunks of 16 tokens sent, prefill not finished
    pair.flush()
    assert pair.P.kv_sender.arena.allocs
    pair.P.abort_request("x")
    pair.D.abort_request("x")  # releases the region back to the sender
    pair.D.poll_transfers()
    pair.assert_clean()


def test_stalled_transfer_times_out(tiny):
    pair = Pair(tiny)
    pair.D.kv_receiver.timeout_s = 0.0
    p = prompts_for(384)[2]
    pair.D.reserve_kv("stall", p, GREEDY, seed=1, reuse_tokens=0)
    assert pair.D.poll_transfers() == ["stall"]
    assert pair.D.kv_receiver.num_failed == 1
    pair.assert_clean()


def test_slot_runs_cover_exactly_the_token_slots():
    import random

    from splitserve.kv.connector import slot_runs, token_slots

    rng = random.Random(0)
    for _ in range(200):
        bs = rng.choice([1, 4, 16])
        blocks = rng.sample(range(64), 20) if rng.random() < 0.5 else list(range(5, 25))
        start = rng.randrange(0, 20 * bs - 1)
        end = rng.randrange(start + 1, 20 * bs + 1)
        expect = token_slots(blocks, bs, start, end).tolist()
        runs = slot_runs(blocks, bs, start, end)
        if runs is None:
            continue  # too fragmented: the scatter path handles it
        got = [0] * (end - start)
        for slot, off, n in runs:
            got[off : off + n] = range(slot, slot + n)
        assert got == expect
