"""The prefill side's arena: a region is freed only when its reader can no longer read it."""

from __future__ import annotations

import os
import subprocess

import torch

from splitserve.kv.handoff import HandoffTimeouts
from splitserve.kv.layout import token_slots
from tests.kv_pair import GREEDY, Pair, expected, no_leftover_shared_memory, tiny  # noqa: F401 (fixtures)
from tests.test_model_vs_hf import prompts_for

LONG_WAIT_S = 1000.0  # far past any release timeout


def _prefill(pair, rid, prompt, dest_pid):
    pair.P.add_prefill_request(rid, prompt, GREEDY, 11, "D", 0, "shm", dest_pid=dest_pid)
    first = []
    while pair.P.has_unfinished():
        first += [o.new_token for o in pair.P.step() if o.request_id == rid]
    return first


def _region(sender, rid) -> bytes:
    off, length, _ = sender.arena.allocs[rid]
    return bytes(sender.arena.segment.buf[off : off + length])


def _decode(pair, rid, outputs):
    while pair.D.has_unfinished():
        assert not pair.D.poll_transfers()
        outputs += [o.new_token for o in pair.D.step() if o.request_id == rid]
    return outputs


def test_a_region_outlives_a_long_wait_for_blocks(tiny, expected):
    prompts = prompts_for(384)
    long_i, short_i = len(prompts) - 1, 1
    pair = Pair(tiny, timeouts=HandoffTimeouts(early_ttl_s=1e9))
    tx = pair.P.kv_sender
    # The arena holds exactly the waiting transfer: the other request must take a one-off segment.
    tx.arena_bytes = -(-tx.num_layers * len(prompts[long_i]) * tx.token_bytes // 4096) * 4096
    first = _prefill(pair, "wait", prompts[long_i], os.getpid())
    sent = _region(tx, "wait")
    pair.flush()  # the decode side holds the notices; its blocks are not reserved yet
    pair.now += LONG_WAIT_S
    tx.poll()
    assert "wait" in tx.arena.allocs  # its reader is alive and has not released it

    # Meanwhile another request goes through (a one-off segment: the arena is full) and lands right.
    assert pair.generate([prompts[short_i]], GREEDY) == [expected[short_i]]
    assert _region(tx, "wait") == sent  # nothing overwrote the waiting transfer's KV

    pair.reserve("wait", prompts[long_i], GREEDY)
    pair.flush()
    n = len(prompts[long_i])
    staged = torch.frombuffer(bytearray(sent), dtype=tx.dtype)[: tx.num_layers * 2 * n * tx.num_kv_heads * tx.head_dim]
    staged = staged.view(tx.num_layers, 2, n, tx.num_kv_heads, tx.head_dim)
    slots = token_slots(pair.D.scheduler.block_manager.blocks_of("wait"), pair.D.config.block_size, 0, n)
    for layer, (k, v) in enumerate(pair.D.runner.kv_caches):
        assert torch.equal(k[slots], staged[layer, 0]) and torch.equal(v[slots], staged[layer, 1])
    assert _decode(pair, "wait", first) == expected[long_i]
    assert not tx.arena.allocs  # released by the decode side once landed
    pair.assert_clean()


def test_a_region_is_reclaimed_once_its_reader_is_gone(tiny):
    prompts = prompts_for(384)
    pair = Pair(tiny)
    tx = pair.P.kv_sender
    gone = subprocess.Popen(["true"])
    gone.wait()
    _prefill(pair, "orphan", prompts[1], gone.pid)
    _prefill(pair, "live", prompts[2], os.getpid())
    _prefill(pair, "unknown", prompts[3], 0)
    pair.flush()
    pair.now += 2.0
    tx.poll()
    assert set(tx.arena.allocs) == {"live", "unknown"}  # only a reader known to be gone loses its region
    # The decode side never reserves them: once its early chunks expire it releases what it held.
    pair.now += HandoffTimeouts().early_ttl_s + 1
    pair.D.poll_transfers()
    assert not tx.arena.allocs
    pair.assert_clean()


def test_a_placement_names_the_reader_of_a_region_already_staged(tiny):
    """No pid came with the PrefillRequest: the KVPlacement's pid makes the region reclaimable."""
    prompt = prompts_for(384)[-1]
    pair = Pair(tiny, p_kw=dict(max_num_batched_tokens=16), direct=True, hold_placements=True)
    tx = pair.P.kv_sender
    pair.reserve("x", prompt, GREEDY)
    pair.P.add_prefill_request("x", prompt, GREEDY, 11, "D", 0, "shm")
    pair.P.step()  # the placement is held back: the first step goes through the arena
    assert tx.arena.allocs["x"][2] == 0
    pair.release_placements()
    assert tx.arena.allocs["x"][2] == os.getpid()
    pair.P.abort_request("x")
    pair.D.abort_request("x")
    pair.flush()
    pair.D.poll_transfers()
    assert not tx.arena.allocs
    pair.assert_clean()
