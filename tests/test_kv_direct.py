"""Same-host KV handoff straight into the decode worker's shared-memory cache (KVPlacement), and
the fence: a block another process may still write into is never given to anyone else."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from splitserve.cluster import messages as m
from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.kv import shm
from tests.kv_pair import _engine_kw
from tests.kv_pair import GREEDY, Pair, engine, expected, no_leftover_shared_memory, tiny  # noqa: F401 (fixtures)
from tests.test_model_vs_hf import prompts_for


@pytest.mark.parametrize("p_kw,d_kw", [({}, {}), (dict(block_size=16, max_num_batched_tokens=24), dict(block_size=4))])
def test_direct_writes_into_the_decode_cache(tiny, expected, p_kw, d_kw):
    """Same host: the prefill side writes into the decode engine's shared cache, no arena copy."""
    pair = Pair(tiny, p_kw=p_kw, d_kw=d_kw, direct=True, arena_bytes=1 << 20)
    assert pair.generate(prompts_for(384), GREEDY) == expected
    tx = pair.P.kv_sender
    assert tx.bytes_direct == tx.bytes_sent > 0
    assert not tx.arena or not tx.arena.allocs
    assert pair.D.kv_receiver.bytes_received == tx.bytes_sent
    pair.assert_clean()


def test_direct_after_a_late_placement_and_when_fragmented(tiny, expected, monkeypatch):
    """The first step goes through the arena (placement not there yet), later ones direct; a
    single allowed run forces the gather/scatter path for direct writes."""
    from splitserve.kv import layout

    monkeypatch.setattr(layout, "MAX_RUNS", 1)
    pair = Pair(tiny, p_kw=dict(max_num_batched_tokens=16), direct=True, hold_placements=True)
    assert pair.generate(prompts_for(384), GREEDY) == expected
    tx = pair.P.kv_sender
    assert 0 < tx.bytes_direct < tx.bytes_sent
    pair.assert_clean()


def test_direct_with_decode_side_prefix_reuse(tiny):
    pair = Pair(tiny, direct=True)
    base = prompts_for(384)[-1]
    turn2 = base + prompts_for(384, seed=3)[3]
    ref = engine(tiny).generate([base, turn2], GREEDY)
    assert pair.D.generate([base], GREEDY) == ref[:1]
    assert pair.generate([turn2], GREEDY, reuse=lambda p: 96) == ref[1:]
    assert pair.P.kv_sender.bytes_direct == (len(turn2) - 96) * pair.P.kv_sender.token_bytes * pair.P.kv_sender.num_layers
    pair.assert_clean()


def _mid_transfer(pair, rid="x"):
    p = prompts_for(384)[-1]
    pair.reserve(rid, p, GREEDY, seed=1)
    pair.P.add_prefill_request(rid, p, GREEDY, 1, "D", 0, "shm")
    pair.P.step()
    pair.P.step()
    pair.flush()
    assert pair.P.kv_sender.transfers[rid].path.dest is not None
    return p


def test_decode_abort_first_keeps_blocks_until_the_writer_stops(tiny):
    """The decode side gives up while the prefill side may still write: the blocks stay reserved
    (nobody else can get them) until KVStopped, then everything is freed."""
    pair = Pair(tiny, p_kw=dict(max_num_batched_tokens=16), direct=True)
    _mid_transfer(pair)
    bm = pair.D.scheduler.block_manager
    held = list(bm.blocks_of("x"))
    pair.D.abort_request("x")
    pair.D.poll_transfers()
    assert pair.D.handoff.is_fenced("x") and bm.blocks_of("x") == held and not pair.D.is_idle()
    # Another request cannot be given those blocks meanwhile.
    other = pair.D.add_request("y", prompts_for(384)[0], GREEDY)
    pair.D.step()
    assert not set(bm.blocks_of(other.request_id)) & set(held)
    pair.P.step()  # the writer writes once more, into blocks still reserved for x
    pair.P.abort_request("x")
    pair.flush()  # KVStopped arrives
    assert not pair.D.handoff.is_fenced("x")
    while pair.D.has_unfinished():
        pair.D.step()
    pair.assert_clean()


def test_fence_lifts_when_the_writer_process_is_gone(tiny):
    pair = Pair(tiny, p_kw=dict(max_num_batched_tokens=16), direct=True)
    _mid_transfer(pair)
    dead = subprocess.Popen(["true"])
    dead.wait()
    pair.D.kv_receiver.landing["x"].writer_pid = dead.pid  # as if the prefill worker were killed
    pair.D.abort_request("x")
    assert pair.D.handoff.is_fenced("x")
    pair.D.poll_transfers()
    assert not pair.D.handoff.fenced()
    pair.P.abort_request("x")
    pair.flush()
    pair.assert_clean()


def test_placement_that_loses_the_race_with_the_prefill(tiny, expected):
    """The prefill ends before the placement reaches it: finished normally, the placement is
    ignored; aborted, the prefill side answers KVStopped so the decode side can free its blocks."""
    pair = Pair(tiny, direct=True, hold_placements=True)
    prompt = prompts_for(384)[0]
    assert pair.generate([prompt], GREEDY) == expected[:1]
    pair.assert_clean()
    pair = Pair(tiny, direct=True, hold_placements=True)
    pair.P.add_prefill_request("late", prompt, GREEDY, 1, "D", 0, "shm")
    pair.P.abort_request("late")
    pair.flush()  # its KVStopped reaches D before D even heard of the request
    pair.reserve("late", prompt, GREEDY)
    pair.D.abort_request("late")
    assert pair.D.handoff.is_fenced("late")  # D's placement is out: it must hear that P stopped
    pair.release_placements()
    pair.flush()
    assert not pair.D.handoff.fenced()
    pair.assert_clean()


@pytest.mark.parametrize("arrives_at_layer", [0, 1])
def test_placement_arriving_between_layers_switches_the_rest_of_the_step(tiny, expected, arrives_at_layer):
    """A one-step prefill: the placement comes in while layer 0 or 1 is due, so the layers before
    went through the arena (or none did: no arena region may stay held) and the rest straight
    into the decode cache."""
    pair = Pair(tiny, direct=True, hold_placements=True)
    calls = []

    def fetch():
        calls.append(1)
        if len(calls) == arrives_at_layer + 1:
            pair.release_placements()

    pair.P.kv_sender.poll_inbox = fetch
    prompt = prompts_for(384)[1]
    assert pair.generate([prompt], GREEDY) == expected[1:2]
    tx = pair.P.kv_sender
    layers = tx.num_layers
    assert len(calls) == arrives_at_layer + 1 and layers > 1
    assert tx.bytes_direct == tx.bytes_sent * (layers - arrives_at_layer) // layers
    pair.assert_clean()


def test_shared_cache_that_does_not_fit_falls_back_to_a_private_one(tiny, monkeypatch):
    """A container's small /dev/shm: no SIGBUS later, no file left, the arena path instead."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    cluster = f"test{uuid.uuid4().hex[:8]}"
    e = LLMEngine(EngineConfig(**_engine_kw(tiny)), kv_cache_segment=shm.segment_name(cluster, "D-kvcache-1"))
    assert e.kv_segment is None and shm.list_segments(cluster) == []
    assert e.generate([prompts_for(384)[0]], GREEDY)
    e.check_integrity()
    assert e.is_idle()


def test_decode_worker_restart_mid_step_does_not_break_the_prefill_side(tiny):
    """A placement from a restarted decode worker (same owner, new segment) unmaps the old cache
    while a transfer to it is mid-prefill: the prefill side keeps going, writes nothing there."""
    pair = Pair(tiny, p_kw=dict(max_num_batched_tokens=16), direct=True)
    _mid_transfer(pair)
    tx = pair.P.kv_sender
    reborn = shm.segment_name(pair.cluster, "D-kvcache-2")
    k0 = pair.D.runner.kv_caches[0][0]
    slots = 64
    seg = shm.Segment(reborn, size=tx.num_layers * 2 * slots * k0.shape[1] * k0.shape[2] * 4)
    try:
        short = prompts_for(384)[0][:8]
        pair.P.add_prefill_request("other", short, GREEDY, 1, "D2", 0, "shm")
        tx.place(m.KVPlacement("other", reborn, tx.num_layers, slots, k0.shape[1], k0.shape[2], "float32", 4,
                               [0, 1, 2], "D2"))
        assert tx.transfers["other"].path.dest is not None
        assert tx.transfers["x"].path.dest is None  # the old cache is gone
        direct_before = tx.bytes_direct
        while pair.P.has_unfinished():
            pair.P.step()
        # Only the new request's tokens went direct (into the new cache); x went by the arena.
        assert tx.bytes_direct == direct_before + len(short) * tx.token_bytes * tx.num_layers
    finally:
        pair.P.abort_request("other")
        pair.D.abort_request("x")
        pair.flush()
        pair.D.abort_request("other")  # its chunks were meant for the reborn worker, not D
        pair.D.poll_transfers()
        seg.close()
        seg.unlink()
    pair.assert_clean()


def test_fence_lifts_on_a_prefill_done_that_crossed_the_abort(tiny):
    """The prefill finished (PrefillDone in flight) just as the decode side aborted: no KVStopped
    will come, and the PrefillDone must free the fenced blocks."""
    pair = Pair(tiny, p_kw=dict(max_num_batched_tokens=16), direct=True)
    _mid_transfer(pair)
    while pair.P.has_unfinished():
        pair.P.step()
    pair.D.abort_request("x")
    assert pair.D.handoff.is_fenced("x")
    pair.flush()
    assert not pair.D.handoff.fenced()
    pair.assert_clean()
