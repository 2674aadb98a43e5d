"""Router policies without processes."""

from __future__ import annotations

import pytest

from splitserve.cluster.router import NoWorkerAvailable, Router, RouterConfig, WorkerView
from splitserve.engine.block_hash import block_hashes_for

PROMPT = list(range(100, 164))  # 64 tokens = 4 blocks of 16


def cluster(threshold=0, **kw):
    r = Router(RouterConfig(local_prefill_threshold=threshold, **kw))
    r.add_worker(WorkerView("p0", "prefill", 16, 100))
    r.add_worker(WorkerView("p1", "prefill", 16, 100))
    r.add_worker(WorkerView("d0", "decode", 16, 100))
    r.add_worker(WorkerView("d1", "decode", 16, 100))
    return r


def stored(tokens, block_size=16):
    return [("stored", h) for h in block_hashes_for(tokens, block_size)]


def test_prefill_goes_to_least_queued_worker():
    r = cluster()
    r.update_load("p0", kv_blocks_free=100, num_running=0, num_waiting=0, queued_prefill_tokens=500)
    assert r.place(PROMPT).prefill_worker == "p1"


def test_prefix_overlap_beats_small_queue_difference():
    r = cluster()
    r.apply_kv_events("p0", stored(PROMPT[:48]))
    r.update_load("p0", kv_blocks_free=100, num_running=0, num_waiting=0, queued_prefill_tokens=16)
    pl = r.place(PROMPT)
    assert pl.prefill_worker == "p0" and pl.prefill_cached_tokens == 48


def test_decode_prefers_free_capacity_and_small_batch():
    r = cluster()
    r.update_load("d0", kv_blocks_free=3, num_running=5, num_waiting=0, queued_prefill_tokens=0)
    assert r.place(PROMPT).decode_worker == "d1"
    r.update_load("d0", kv_blocks_free=100, num_running=0, num_waiting=0, queued_prefill_tokens=0)
    r.update_load("d1", kv_blocks_free=100, num_running=4, num_waiting=0, queued_prefill_tokens=0)
    assert r.place(PROMPT).decode_worker == "d0"


def test_multi_turn_reuses_the_decode_workers_prefix():
    r = cluster()
    r.apply_kv_events("d1", stored(PROMPT))
    turn2 = PROMPT + list(range(500, 520))
    pl = r.place(turn2)
    assert pl.decode_worker == "d1" and pl.decode_cached_tokens == 64


def test_conditional_disaggregation_prefills_short_uncached_part_locally():
    r = cluster(threshold=32)
    assert r.place(PROMPT[:20]).prefill_worker is None
    assert r.place(PROMPT).prefill_worker is not None
    r.apply_kv_events("d0", stored(PROMPT[:48]))
    pl = r.place(PROMPT)  # only 16 uncached tokens on d0
    assert pl.decode_worker == "d0" and pl.prefill_worker is None and pl.decode_cached_tokens == 48


def test_block_sizes_may_differ_between_workers():
    r = Router()
    r.add_worker(WorkerView("p0", "prefill", 8, 100))
    r.add_worker(WorkerView("d0", "decode", 32, 100))
    r.apply_kv_events("p0", stored(PROMPT, 8))
    r.apply_kv_events("d0", stored(PROMPT[:32], 32))
    pl = r.place(PROMPT)
    assert pl.prefill_cached_tokens == 63 and pl.decode_cached_tokens == 32


def test_unhealthy_workers_are_skipped_and_forget_their_cache():
    r = cluster(threshold=0)
    r.apply_kv_events("d0", stored(PROMPT))
    r.set_health("d0", False)
    assert r.place(PROMPT).decode_worker == "d1"
    r.set_health("d0", True)
    assert not r.workers["d0"].cached
    for w in ("p0", "p1"):
        r.set_health(w, False)
    assert r.place(PROMPT).prefill_worker is None  # no prefill pool: decode prefills locally
    for w in ("d0", "d1"):
        r.set_health(w, False)
    with pytest.raises(NoWorkerAvailable):
        r.place(PROMPT)


def test_dispatch_accounting_spreads_a_burst():
    r = cluster()
    seen = []
    for _ in range(4):
        pl = r.place(PROMPT)
        r.on_dispatch(pl, len(PROMPT))
        seen.append((pl.prefill_worker, pl.decode_worker))
    assert {p for p, _ in seen} == {"p0", "p1"} and {d for _, d in seen} == {"d0", "d1"}


def test_block_hashes_of_a_token_array_equal_those_of_the_list():
    """The simulator keeps token ids in array("q"): same bytes, same chained hashes, extended alike."""
    from array import array

    tokens = [3, 1 << 40, 7, 2**63 - 1, -5] * 13
    for bs in (1, 4, 16):
        ref = block_hashes_for(tokens, bs)
        assert block_hashes_for(array("q", tokens), bs) == ref
        known = block_hashes_for(tokens[: 2 * bs], bs)
        assert block_hashes_for(array("q", tokens), bs, known) == ref and known == ref
