"""Decode side of the KV handoff, the data plane (`KVReceiver`): land arriving KV in reserved blocks.

The transfer states, timeouts and the fence rule live in the pure `DecodeHandoff`
(`kv/handoff.py`), which the engine owns and drives; the engine alone reserves and admits. This
class turns messages into handoff events and carries out the data-plane actions: tell a same-host
prefill worker where to write (KVPlacement), copy arena and TCP chunks into the blocks (chunks
that beat the reservation wait in a bounded buffer), count direct writes, release the sender's
shared memory. On the raw TCP channel it receives straight into the reserved slots.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from splitserve.cluster import messages as m
from splitserve.kv import shm, tcp
from splitserve.kv.handoff import Act, Action, Chunk, DecodeHandoff, Done, RxState, Stopped
from splitserve.kv.layout import KVSide, dtype_name, process_alive, slot_runs, token_slots, wire_dtype

log = logging.getLogger("splitserve.kv")
# Received payloads are read-only buffers that we only ever read from.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

SendFn = Callable[[str, list], None]
MAX_BUFFERED_BYTES = 512 * 1024 * 1024  # chunks that arrived before their reservation
_OPEN = (None, RxState.EARLY, RxState.RESERVING, RxState.PLACED, RxState.LANDING)  # may still land KV


@dataclass
class _Landing:
    """The data plane's side of one transfer."""

    pending: list[tuple[object, tuple]] = field(default_factory=list)  # chunks waiting for blocks
    source: tuple[str, str, bool] | None = None  # (reply_to, shm name, arena?) of the sender's memory
    writer: str = ""  # same-host prefill worker to offer a placement to
    writer_pid: int = 0
    placements: dict = field(default_factory=dict)  # (token_start, n) -> slot runs or slot tensor
    move_seconds: float = 0.0  # time spent landing its KV here
    wire_started: dict = field(default_factory=dict)  # TCP: (layer, token_start) -> when its header came
    send_seconds: float = 0.0  # the sender's share, from PrefillDone


class KVReceiver(KVSide):
    def __init__(self, handoff: DecodeHandoff, blocks_of: Callable[[str], list[int]], kv_caches, block_size: int,
                 send: SendFn | None = None, shared_cache: str | None = None, reply_to: str = "",
                 data_host: str | None = None, secret: bytes = b"",
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`blocks_of`: a request's reserved blocks (read only); `shared_cache`: the shared-memory
        segment holding `kv_caches` (CPU), offered to same-host prefill workers as a write target;
        `reply_to`: this worker's inbox; `data_host`: open a raw TCP data port there (CPU caches)."""
        super().__init__(kv_caches, block_size, send, reply_to, secret, clock)
        self.handoff = handoff
        self.blocks_of = blocks_of
        self.shared_cache = shared_cache
        self.landing: dict[str, _Landing] = {}
        self.mapped: dict[str, shm.Segment] = {}  # arenas (kept mapped) and one-off segments in use
        self.data: tcp.DataReceiver | None = None
        if data_host is not None and self.device.type == "cpu":
            self.data = tcp.DataReceiver(data_host, secret, self._tcp_place, self._tcp_landed, self._tcp_still_placed)
        self.buffered_bytes = 0
        self.bytes_received = 0
        self.transfer_seconds = 0.0  # time spent moving KV (sender copies + landing), not queue or prefill

    @property
    def num_done(self) -> int:
        return self.handoff.num_done

    @property
    def num_failed(self) -> int:
        return self.handoff.num_failed

    @property
    def num_active(self) -> int:
        return self.handoff.num_active

    @property
    def busy(self) -> bool:
        return self.handoff.busy

    def expect(self, request_id: str, writer: str = "", writer_pid: int = 0) -> bool:
        """A ReserveKV came: remember the writer (placement target, liveness). True when a
        placement can be offered (a same-host writer and a shared cache)."""
        land = self.landing.setdefault(request_id, _Landing())
        if writer and self.shared_cache and self.send is not None:
            land.writer, land.writer_pid = writer, writer_pid
        return bool(land.writer)

    # ---- messages -> handoff events ----------------------------------------------------------
    def on_message(self, hdr, frames: tuple = ()) -> list[Action]:
        """A KVChunk, PrefillDone or KVStopped. Returns the handoff's actions for the engine."""
        now = self.clock()
        if isinstance(hdr, m.KVChunk):
            self._on_chunk(hdr, tuple(frames), now)
            return []
        if isinstance(hdr, m.PrefillDone):
            if self.handoff.state(hdr.request_id) in _OPEN:
                self.landing.setdefault(hdr.request_id, _Landing()).send_seconds = hdr.send_seconds
            return self.handoff.on(Done(hdr.request_id, hdr.first_token, hdr.token_end, hdr.send_seconds), now)
        if isinstance(hdr, m.KVStopped):
            return self.handoff.on(Stopped(hdr.request_id), now)
        raise TypeError(f"not a KV message: {type(hdr).__name__}")

    def _on_chunk(self, hdr: m.KVChunk, frames: tuple, now: float) -> None:
        size = sum(len(f) for f in frames)
        if not self.handoff.is_reserved(hdr.request_id) and self.buffered_bytes + size > MAX_BUFFERED_BYTES:
            log.warning("dropping an early KV chunk for %s: buffer full", hdr.request_id)
            self._discard([(hdr, frames)])
            return
        layers = hdr.num_layers_covered if hdr.direct else 1
        for a in self.handoff.on(Chunk(hdr.request_id, hdr.layer, layers, hdr.token_start, hdr.num_tokens), now):
            if a.kind is Act.DISCARD:
                self._discard([(hdr, frames)])
            elif a.kind is Act.BUFFER:
                self.buffered_bytes += size
                self.landing.setdefault(hdr.request_id, _Landing()).pending.append((hdr, frames))
            else:
                self._land(self.landing.setdefault(hdr.request_id, _Landing()), hdr, frames)

    # ---- actions -----------------------------------------------------------------------------
    def execute(self, actions: list[Action]) -> list[tuple[str, object]]:
        """Carry out the data-plane actions; returns (request id, FailureReason) to report."""
        failed = []
        for a in actions:
            rid = a.request_id
            if a.kind is Act.LAND:
                land = self.landing.get(rid)
                if land is not None and land.pending:
                    pending, land.pending = land.pending, []
                    for hdr, frames in pending:
                        self.buffered_bytes = max(0, self.buffered_bytes - sum(len(f) for f in frames))
                        self._land(land, hdr, frames)
            elif a.kind is Act.OFFER_PLACEMENT:
                self._offer_placement(rid)
            elif a.kind is Act.ADMIT:
                land = self.landing.get(rid)
                if land is not None:
                    self.transfer_seconds += land.move_seconds + land.send_seconds
            elif a.kind is Act.RELEASE_SOURCE:
                self._release(rid)
            elif a.kind is Act.FREE_BLOCKS:
                if a.arg:
                    log.warning("freeing the blocks of %s: its writer never said it stopped", rid)
                self.landing.pop(rid, None)
            elif a.kind is Act.REPORT_FAILURE:
                log.warning("KV transfer for %s failed: %s", rid, a.arg.value)
                failed.append((rid, a.arg))
        return failed

    def writers_gone(self, request_ids: list[str]) -> list[str]:
        """Of these (fenced) transfers, those whose writer's process is gone (same host)."""
        gone = []
        for rid in request_ids:
            land = self.landing.get(rid)
            if land is not None and land.writer_pid and not process_alive(land.writer_pid):
                gone.append(rid)
        return gone

    def expire(self) -> None:
        if self.data is not None and self.data.conns:
            self.data.expire()

    def _offer_placement(self, rid: str) -> None:
        land = self.landing.get(rid)
        if land is None or not land.writer:
            return
        k0 = self.kv_caches[0][0]
        self.send(land.writer, [m.encode(m.KVPlacement(
            rid, self.shared_cache, self.num_layers, k0.shape[0], k0.shape[1], k0.shape[2], dtype_name(self.dtype),
            self.block_size, list(self.blocks_of(rid)), self.reply_to, os.getpid()))])

    def _release(self, rid: str) -> None:
        """The sender's memory for this transfer, and anything still buffered, goes back."""
        land = self.landing.get(rid)
        if land is None:
            return
        self._discard(land.pending)
        land.pending = []
        if not self.handoff.is_fenced(rid):  # a fenced one keeps its writer's pid for the liveness check
            del self.landing[rid]
        if land.source is None:
            return
        reply_to, name, arena = land.source
        land.source = None
        if arena:
            if self.send is not None and reply_to:
                self.send(reply_to, [m.encode(m.KVRelease(rid))])
        else:
            seg = self.mapped.pop(name, None)
            if seg is not None:
                seg.close()
            shm.unlink(name)

    def _discard(self, msgs) -> None:
        for hdr, frames in msgs:
            self.buffered_bytes = max(0, self.buffered_bytes - sum(len(f) for f in frames))
            if isinstance(hdr, m.KVChunk) and hdr.shm_name:
                if hdr.arena:
                    if self.send is not None and hdr.reply_to:
                        self.send(hdr.reply_to, [m.encode(m.KVRelease(hdr.request_id))])
                else:
                    shm.unlink(hdr.shm_name)

    # ---- landing -----------------------------------------------------------------------------
    def _segment(self, name: str, arena: bool) -> shm.Segment:
        seg = self.mapped.get(name)
        if seg is None:
            if arena:  # a restarted sender has a new arena: unmap its predecessor's
                owner = name.rsplit("-arena-", 1)[0]
                for old in [n for n in self.mapped if n.rsplit("-arena-", 1)[0] == owner and "-arena-" in n]:
                    self.mapped.pop(old).close()
            seg = self.mapped[name] = shm.Segment(name, populate=arena)  # arenas: map once, fault once
        return seg

    def _placement(self, land: _Landing, rid: str, start: int, n: int):
        """Where tokens [start, start + n) go: slot runs, or a slot tensor when fragmented."""
        key = (start, n)
        where = land.placements.get(key)
        if where is None:  # the same for every layer: work it out once
            blocks = self.blocks_of(rid)
            where = slot_runs(blocks, self.block_size, start, start + n)
            if where is None:
                where = token_slots(blocks, self.block_size, start, start + n).to(self.device)
            land.placements[key] = where
        return where

    def _land(self, land: _Landing, hdr: m.KVChunk, frames: tuple) -> None:
        t0 = time.perf_counter()
        n, heads, dim = hdr.num_tokens, hdr.num_kv_heads, hdr.head_dim
        if not 0 <= hdr.layer < self.num_layers or n <= 0 or hdr.token_start < 0:
            raise ValueError(f"bad KV chunk: layer {hdr.layer}, tokens {hdr.token_start}+{n}")
        if hdr.shm_name and land.source is None:
            land.source = (hdr.reply_to, hdr.shm_name, hdr.arena)
        if hdr.direct:  # already in our blocks: just count it
            layers = min(hdr.layer + hdr.num_layers_covered, self.num_layers) - hdr.layer
            self.bytes_received += 2 * n * heads * dim * wire_dtype(hdr.dtype).itemsize * layers
            return
        k_cache, v_cache = self.kv_caches[hdr.layer]
        if (heads, dim) != tuple(k_cache.shape[1:]):
            raise ValueError(f"KV shape mismatch: sender {heads}x{dim}, receiver {tuple(k_cache.shape[1:])}")
        src_dtype = wire_dtype(hdr.dtype)
        count = n * heads * dim
        if hdr.shm_name:
            buf = self._segment(hdr.shm_name, hdr.arena).buf
            k = torch.frombuffer(buf, dtype=src_dtype, count=count, offset=hdr.k_offset)
            v = torch.frombuffer(buf, dtype=src_dtype, count=count, offset=hdr.v_offset)
        else:
            if len(frames) != 2:
                raise ValueError("a TCP KV chunk needs K and V frames")
            k = torch.frombuffer(frames[0], dtype=src_dtype, count=count)
            v = torch.frombuffer(frames[1], dtype=src_dtype, count=count)
        k = k.view(n, heads, dim).to(device=self.device, dtype=self.dtype)
        v = v.view(n, heads, dim).to(device=self.device, dtype=self.dtype)
        where = self._placement(land, hdr.request_id, hdr.token_start, n)
        if isinstance(where, list):
            for slot, off, length in where:
                k_cache[slot : slot + length].copy_(k[off : off + length])
                v_cache[slot : slot + length].copy_(v[off : off + length])
        else:
            k_cache.index_copy_(0, where, k)
            v_cache.index_copy_(0, where, v)
        self.bytes_received += 2 * count * src_dtype.itemsize
        land.move_seconds += time.perf_counter() - t0

    # ---- the raw TCP data channel: receive into our own slots --------------------------------
    def _tcp_place(self, hdr: m.KVChunk):
        t = self.handoff.get(hdr.request_id)
        k_cache, _ = self.kv_caches[0]
        if (t is None or not self.handoff.is_reserved(hdr.request_id) or hdr.dtype != dtype_name(self.dtype)
                or not 0 <= hdr.layer < self.num_layers or (hdr.num_kv_heads, hdr.head_dim) != tuple(k_cache.shape[1:])
                or hdr.token_start + hdr.num_tokens > t.request.num_tokens or hdr.token_start < t.reuse_tokens):
            return None  # lands in a scratch buffer and takes the usual path (buffer, convert or reject)
        land = self.landing.setdefault(hdr.request_id, _Landing())
        where = self._placement(land, hdr.request_id, hdr.token_start, hdr.num_tokens)
        if not isinstance(where, list):
            return None
        land.wire_started[(hdr.layer, hdr.token_start)] = time.perf_counter()
        k_cache, v_cache = self.kv_caches[hdr.layer]
        ks = [k_cache[slot : slot + length].view(torch.uint8).numpy() for slot, _, length in where]
        vs = [v_cache[slot : slot + length].view(torch.uint8).numpy() for slot, _, length in where]
        return ks, vs

    def _tcp_still_placed(self, hdr: m.KVChunk) -> bool:
        return self.handoff.is_reserved(hdr.request_id)

    def _tcp_landed(self, hdr: m.KVChunk, scratch) -> None:
        if scratch is not None:
            self._on_chunk(hdr, scratch, self.clock())
            return
        land = self.landing.setdefault(hdr.request_id, _Landing())
        t0 = land.wire_started.pop((hdr.layer, hdr.token_start), None)
        if t0 is not None:
            land.move_seconds += time.perf_counter() - t0  # header to last byte: the chunk on the wire
        self.handoff.on(Chunk(hdr.request_id, hdr.layer, 1, hdr.token_start, hdr.num_tokens), self.clock())
        self.bytes_received += 2 * tcp.chunk_bytes(hdr)

    def close(self) -> None:
        for land in self.landing.values():
            self._discard(land.pending)
        self.landing.clear()
        for seg in self.mapped.values():
            seg.close()
        self.mapped.clear()
        if self.data is not None:
            self.data.close()
            self.data = None
