"""Prefill engine -> KV connector -> decode engine, in one process: identical to aggregated output.
Same-host direct writes and the fence are in test_kv_direct.py."""

from __future__ import annotations

import pytest

from splitserve.cluster import messages as m
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv.handoff import HandoffTimeouts
from tests.kv_pair import GREEDY, Pair, engine, expected, no_leftover_shared_memory, tiny  # noqa: F401 (fixtures)
from tests.test_model_vs_hf import prompts_for


@pytest.mark.parametrize("transport,arena", [("shm", 1 << 20), ("shm", 0), ("shm", 4096), ("tcp", 0),
                                             ("tcp-data", 0)])
def test_handoff_matches_aggregated(tiny, expected, transport, arena):
    """Arena of 1 MiB (regions reused), none (one-off segments), 4 KiB (mostly overflowing), TCP
    frames over ZeroMQ, TCP on the raw data channel (received straight into the reserved slots)."""
    pair = Pair(tiny, transport=transport, arena_bytes=arena)
    assert pair.generate(prompts_for(384), GREEDY) == expected
    assert pair.D.kv_receiver.num_done == len(expected)
    if transport == "tcp-data":
        assert pair.D.kv_receiver.data.bytes_direct == pair.P.kv_sender.bytes_sent > 0
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
    pair.reserve("x", p, GREEDY, seed=1)
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
    pair = Pair(tiny, timeouts=HandoffTimeouts(queued_s=0.0))
    p = prompts_for(384)[2]
    pair.reserve("stall", p, GREEDY, seed=1)
    pair.now += 0.001
    assert pair.D.poll_transfers() == [("stall", m.FailureReason.TRANSFER_STALLED)]
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


def test_paired_runs_cover_exactly_both_slot_maps():
    import random

    from splitserve.kv.connector import paired_runs, token_slots

    rng = random.Random(1)
    checked = 0
    for _ in range(300):
        sbs, dbs = rng.choice([1, 4, 16]), rng.choice([1, 4, 16])
        n = 80
        src_blocks = rng.sample(range(200), -(-n // sbs)) if rng.random() < 0.3 else list(range(3, 3 + -(-n // sbs)))
        dst_blocks = rng.sample(range(200), -(-n // dbs)) if rng.random() < 0.3 else list(range(9, 9 + -(-n // dbs)))
        start = rng.randrange(0, n - 1)
        end = rng.randrange(start + 1, n + 1)
        runs = paired_runs(src_blocks, sbs, dst_blocks, dbs, start, end)
        if runs is None:
            continue
        src = token_slots(src_blocks, sbs, start, end).tolist()
        dst = token_slots(dst_blocks, dbs, start, end).tolist()
        got = [(a + i, b + i) for a, b, length in runs for i in range(length)]
        assert got == list(zip(src, dst))
        checked += 1
    assert checked > 100


def test_data_channel_late_reservation_block_sizes_and_a_full_socket(tiny, expected):
    """Chunks that beat the reservation land in scratch buffers and wait; different block sizes;
    tiny socket buffers make the sender queue (copy) what the socket cannot take yet."""
    import socket as socketlib

    from splitserve.kv import tcp

    pair = Pair(tiny, transport="tcp-data", p_kw=dict(block_size=16, max_num_batched_tokens=24),
                d_kw=dict(block_size=4))
    conn = pair.P.kv_sender.data[pair.data_addr] = tcp.DataSender(pair.data_addr, b"s3cret")
    conn.sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_SNDBUF, 4096)
    assert pair.generate(prompts_for(384), GREEDY, reserve_late=True) == expected
    assert conn.bytes_copied > 0
    pair.assert_clean()
    pair = Pair(tiny, transport="tcp-data", p_kw=dict(block_size=16), d_kw=dict(block_size=4))
    assert pair.generate(prompts_for(384), GREEDY) == expected
    assert pair.D.kv_receiver.data.bytes_direct == pair.P.kv_sender.bytes_sent
    pair.assert_clean()


def _raw_client(addr, secret=b"s3cret", magic=None, rx=None):
    """A hand-made data channel client: the challenge-response with `secret` (pumping `rx`, the
    receiver, for its answer), or, with `magic`, a greeting of another protocol."""
    import os as oslib
    import socket as socketlib

    from splitserve.kv import tcp

    s = socketlib.create_connection(tcp.parse_addr(addr))
    nonce = oslib.urandom(tcp.NONCE_BYTES)
    s.sendall((magic or tcp.MAGIC) + nonce)
    if magic is None:
        _pump_for(rx, 0.1)
        challenge = s.recv(tcp.CHALLENGE_BYTES, socketlib.MSG_WAITALL)
        server_nonce = challenge[len(tcp.MAGIC): len(tcp.MAGIC) + tcp.NONCE_BYTES]
        s.sendall(tcp.proof(tcp.data_key(secret), b"client", nonce, server_nonce))
    return s


def _pump_for(rx, seconds=0.3):
    import select
    import time as timelib

    end = timelib.monotonic() + seconds
    while timelib.monotonic() < end:
        readable, _, _ = select.select(rx.fds(), [], [], 0.02)
        for fd in readable:
            rx.pump(fd)


@pytest.mark.parametrize("secret,magic", [(b"wrong", None), (b"s3cret", b"HTTP/1.1"), (b"", None)])
def test_data_channel_rejects_a_wrong_secret_or_protocol(tiny, secret, magic):
    pair = Pair(tiny, transport="tcp-data")
    rx = pair.D.kv_receiver.data
    client = _raw_client(pair.data_addr, secret, magic, rx)
    _pump_for(rx)
    assert rx.rejected == 1 and not rx.conns
    try:
        assert client.recv(16) == b""  # closed on us
    except ConnectionResetError:
        pass  # closed with our unread bytes in its buffer: a reset
    client.close()
    pair.assert_clean()


def test_data_channel_drop_mid_chunk_never_writes_into_freed_blocks(tiny):
    """The decode side aborts while half a chunk has arrived: the other half goes nowhere."""
    import torch

    from splitserve.kv import tcp

    pair = Pair(tiny, transport="tcp-data")
    rx = pair.D.kv_receiver
    prompt = prompts_for(384)[-1]
    pair.reserve("h", prompt, GREEDY)
    k_cache, v_cache = pair.D.runner.kv_caches[0]
    blocks = pair.D.scheduler.block_manager.blocks_of("h")
    slots = token_slots_for(blocks, pair.D.config.block_size, 0, len(prompt))
    k_cache[slots] = 0.0
    v_cache[slots] = 0.0
    heads, dim = k_cache.shape[1:]
    hdr = m.KVChunk("h", 0, 0, len(prompt), heads, dim, "float32")
    payload = torch.ones(2 * len(prompt) * heads * dim, dtype=torch.float32).view(torch.uint8).numpy().tobytes()
    client = _raw_client(pair.data_addr, rx=rx.data)
    head = tcp.frame_buffers(hdr, [], [])[0]
    half = len(payload) // 4  # half of K
    client.sendall(head + payload[:half])
    _pump_for(rx.data)
    assert rx.data.mid_chunk
    pair.D.abort_request("h")
    client.sendall(payload[half:])
    _pump_for(rx.data)
    assert not rx.data.mid_chunk
    written = int((k_cache[slots] != 0).any(dim=(1, 2)).sum())
    assert 0 < written <= len(prompt) // 2  # only what arrived before the abort
    assert not (v_cache[slots] != 0).any()
    client.close()
    pair.assert_clean()


def token_slots_for(blocks, bs, start, end):
    from splitserve.kv.connector import token_slots

    return token_slots(blocks, bs, start, end)


def test_data_channel_chunk_after_a_hole_fails_the_transfer(tiny):
    """A chunk that starts past what arrived for its layer means KV was lost on a broken
    connection: the transfer fails (and is placed again), it is never admitted with stale KV."""
    import torch

    from splitserve.kv import tcp

    pair = Pair(tiny, transport="tcp-data")
    rx = pair.D.kv_receiver
    prompt = prompts_for(384)[-1]
    pair.reserve("gap", prompt, GREEDY)
    k0 = pair.D.runner.kv_caches[0][0]
    heads, dim = k0.shape[1:]
    hdr = m.KVChunk("gap", 0, 16, 16, heads, dim, "float32")  # tokens [0, 16) never came
    payload = torch.zeros(2 * 16 * heads * dim, dtype=torch.float32).view(torch.uint8).numpy().tobytes()
    client = _raw_client(pair.data_addr, rx=rx.data)
    client.sendall(tcp.frame_buffers(hdr, [], [])[0] + payload)
    _pump_for(rx.data)
    assert pair.D.poll_transfers() == [("gap", m.FailureReason.KV_LOST)]
    client.close()
    pair.assert_clean()


def test_data_channel_closes_a_connection_that_never_authenticates(tiny, monkeypatch):
    import socket as socketlib

    from splitserve.kv import tcp

    monkeypatch.setattr(tcp, "AUTH_TIMEOUT_S", 0.2)
    pair = Pair(tiny, transport="tcp-data")
    rx = pair.D.kv_receiver
    idle = socketlib.create_connection(tcp.parse_addr(pair.data_addr))  # connects, says nothing
    _pump_for(rx.data, 0.1)
    assert len(rx.data.conns) == 1
    _pump_for(rx.data, 0.3)
    pair.D.poll_transfers()
    assert not rx.data.conns and rx.data.rejected == 1
    idle.close()
    pair.assert_clean()
