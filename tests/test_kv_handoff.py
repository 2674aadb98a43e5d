"""Prefill engine -> KV connector -> decode engine, in one process: identical to aggregated output."""

from __future__ import annotations

import os
import subprocess
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
            self.P.add_prefill_request(rid, p, params, 11, "D", send_from, self.transport, data_addr=self.data_addr)
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


def _raw_client(addr, secret=b"s3cret", magic=None):
    import socket as socketlib

    from splitserve.kv import tcp

    s = socketlib.create_connection(tcp.parse_addr(addr))
    s.sendall((magic or tcp.MAGIC) + tcp._U16.pack(len(secret)) + secret)
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
    client = _raw_client(pair.data_addr, secret, magic)
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
    client = _raw_client(pair.data_addr)
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
    client = _raw_client(pair.data_addr)
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
