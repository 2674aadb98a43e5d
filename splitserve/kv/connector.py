"""The two halves of the KV connector.

Prefill side (`KVSender`): for each request whose decode happens elsewhere, after every layer of
every step, copy the KV of the tokens that step completed into the wire format and send it:
into a region of a long-lived, pre-faulted shared-memory arena plus a small notice (same host),
or as frames over the socket (TCP). Sending happens between layers, so the transfer overlaps the
rest of the forward pass, and the request's blocks are free as soon as the prefill ends.

Decode side (`KVReceiver`): reserve blocks for the request (sharing any cached prefix), copy
arriving chunks into them (chunks that beat the reservation wait in a bounded buffer), and when
every layer covers every token and the first token is known, hand the request to the scheduler
and release the arena region. Stalled transfers time out; aborted ones release everything.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from splitserve.cluster import messages as m
from splitserve.kv import shm

log = logging.getLogger("splitserve.kv")
# Received payloads are read-only buffers that we only ever read from.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

SendFn = Callable[[str, list], None]  # (destination address, frames after the secret)
MAX_BUFFERED_BYTES = 512 * 1024 * 1024  # TCP chunks that arrived before their reservation
ORPHAN_TTL_S = 30.0
DEFAULT_ARENA_BYTES = 256 * 1024 * 1024


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported KV dtype {name!r}")
    return getattr(torch, name)


def token_slots(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(block_ids, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


MAX_RUNS = 16


def slot_runs(block_ids: list[int], block_size: int, start: int, end: int) -> list[tuple[int, int, int]] | None:
    """Tokens [start, end) as runs of consecutive cache slots: (first slot, offset in the chunk, length).

    Blocks are usually handed out in order, so a chunk is a few runs and lands with plain slice
    copies (memory speed) instead of a scatter (several times slower). None when too fragmented.
    """
    runs: list[list[int]] = []
    pos = start
    while pos < end:
        off = pos % block_size
        slot = block_ids[pos // block_size] * block_size + off
        n = min(block_size - off, end - pos)
        if runs and runs[-1][0] + runs[-1][2] == slot:
            runs[-1][2] += n
        else:
            if len(runs) == MAX_RUNS:
                return None
            runs.append([slot, pos - start, n])
        pos += n
    return [tuple(r) for r in runs]


# ---- prefill side ----------------------------------------------------------------------------
@dataclass
class OutgoingTransfer:
    request_id: str
    dest_addr: str
    send_from: int
    transport: str
    total_tokens: int  # the decode side needs tokens [send_from, total_tokens)
    sent_upto: int
    view: torch.Tensor | None = None  # shm: [layers, 2, tokens, heads, head_dim]
    shm_name: str | None = None
    arena: bool = False
    base_offset: int = 0
    segment: shm.Segment | None = None  # a one-off segment when the arena is full
    bytes_sent: int = 0


@dataclass
class _StepSend:
    transfer: OutgoingTransfer
    start: int
    end: int
    slots: torch.Tensor


class KVSender:
    def __init__(self, owner: str, kv_caches, block_size: int, send: SendFn, reply_to: str = "",
                 arena_bytes: int = DEFAULT_ARENA_BYTES, release_timeout_s: float = 180.0) -> None:
        self.owner = owner
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.send = send
        self.reply_to = reply_to
        self.arena_bytes = arena_bytes
        self.release_timeout_s = release_timeout_s
        self.arena: shm.Arena | None = None
        self.transfers: dict[str, OutgoingTransfer] = {}
        self._step: list[_StepSend] = []
        self.bytes_sent = 0
        k0 = kv_caches[0][0]
        self.num_layers = len(kv_caches)
        self.num_kv_heads, self.head_dim = k0.shape[1], k0.shape[2]
        self.dtype = k0.dtype
        self.row_bytes = self.num_kv_heads * self.head_dim * k0.element_size()  # one token, K or V
        self.token_bytes = 2 * self.row_bytes

    def ensure_arena(self) -> None:
        if self.arena is None and self.arena_bytes > 0:
            import os

            self.arena = shm.Arena(shm.segment_name(self.owner, f"arena-{os.getpid()}"), self.arena_bytes)

    def add(self, request_id: str, dest_addr: str, send_from: int, transport: str, total_tokens: int) -> None:
        self.transfers[request_id] = OutgoingTransfer(request_id, dest_addr, send_from, transport, total_tokens,
                                                      sent_upto=send_from)

    @property
    def active(self) -> bool:
        return bool(self._step)

    def _open_shm(self, t: OutgoingTransfer) -> None:
        n = t.total_tokens - t.send_from
        nbytes = self.num_layers * n * self.token_bytes
        self.ensure_arena()
        off = self.arena.alloc(t.request_id, nbytes, time.monotonic()) if self.arena else None
        if off is not None:
            buf, t.shm_name, t.arena, t.base_offset = self.arena.segment.buf, self.arena.name, True, off
        else:  # arena full (or disabled): a one-off segment, unlinked by the receiver
            t.segment = shm.Segment(shm.segment_name(self.owner, t.request_id), size=nbytes)
            buf, t.shm_name, t.arena, t.base_offset = t.segment.buf, t.segment.name, False, 0
        flat = torch.frombuffer(buf, dtype=self.dtype, count=nbytes // self.dtype.itemsize, offset=t.base_offset)
        t.view = flat.view(self.num_layers, 2, n, self.num_kv_heads, self.head_dim)

    def begin_step(self, plan, block_tables: dict[str, list[int]]) -> None:
        """Work out what this step's layers must ship: every token the step completes, plus, on a
        request's first step, cached prefix tokens the decode side lacks."""
        self._step = []
        for chunk in plan.chunks:
            t = self.transfers.get(chunk.request_id)
            if t is None:
                continue
            end = min(chunk.end, t.total_tokens)
            if end <= t.sent_upto:
                continue  # recomputed after a preemption: already shipped
            if t.transport == "shm" and t.view is None:
                self._open_shm(t)
            slots = token_slots(block_tables[chunk.request_id], self.block_size, t.sent_upto, end)
            self._step.append(_StepSend(t, t.sent_upto, end, slots.to(self.kv_caches[0][0].device)))
            t.sent_upto = end

    def on_layer(self, layer: int) -> None:
        k_cache, v_cache = self.kv_caches[layer]
        for s in self._step:
            t = s.transfer
            n = s.end - s.start
            hdr = m.KVChunk(t.request_id, layer, s.start, n, self.num_kv_heads, self.head_dim,
                            _dtype_name(self.dtype), self.reply_to)
            if t.view is not None:
                rows = slice(s.start - t.send_from, s.end - t.send_from)
                if k_cache.device.type == "cpu":  # one gather per tensor, straight into shared memory
                    torch.index_select(k_cache, 0, s.slots, out=t.view[layer, 0, rows])
                    torch.index_select(v_cache, 0, s.slots, out=t.view[layer, 1, rows])
                else:  # gather on the device, then one copy to host shared memory
                    t.view[layer, 0, rows].copy_(k_cache.index_select(0, s.slots))
                    t.view[layer, 1, rows].copy_(v_cache.index_select(0, s.slots))
                total = t.total_tokens - t.send_from
                hdr.shm_name, hdr.arena = t.shm_name, t.arena
                hdr.k_offset = t.base_offset + ((layer * 2) * total + rows.start) * self.row_bytes
                hdr.v_offset = t.base_offset + ((layer * 2 + 1) * total + rows.start) * self.row_bytes
                self.send(t.dest_addr, [m.encode(hdr)])
            else:
                k = k_cache.index_select(0, s.slots).cpu()
                v = v_cache.index_select(0, s.slots).cpu()
                self.send(t.dest_addr, [m.encode(hdr), k.view(torch.uint8).numpy(), v.view(torch.uint8).numpy()])
            t.bytes_sent += n * self.token_bytes
            self.bytes_sent += n * self.token_bytes

    def end_step(self) -> None:
        self._step = []

    def finish(self, request_id: str, first_token: int | None) -> None:
        """The prefill ended. Tell the decode side (unless the request ended here) and forget the
        transfer; its shared memory now waits for the decode side's release (or its unlink)."""
        t = self.transfers.pop(request_id, None)
        if t is None:
            return
        if first_token is not None and t.sent_upto >= t.total_tokens:
            self.send(t.dest_addr, [m.encode(m.PrefillDone(request_id, first_token, self.num_layers, t.total_tokens))])
            t.view = None
            if t.segment is not None:
                t.segment.close()
        else:
            self._drop(t)

    def abort(self, request_id: str) -> None:
        t = self.transfers.pop(request_id, None)
        if t is not None:
            self._drop(t)
        # A region already handed over stays until the decode side releases it or it times out:
        # freeing it now could hand the bytes to another transfer while the decode side reads.

    def release(self, request_id: str) -> None:
        if self.arena is not None:
            self.arena.release(request_id)

    def poll(self) -> None:
        if self.arena is not None and self.arena.allocs:
            for rid in self.arena.reclaim(time.monotonic() - self.release_timeout_s):
                log.warning("reclaimed the arena region of %s: no release from the decode side", rid)

    def _drop(self, t: OutgoingTransfer) -> None:
        t.view = None
        if t.segment is not None:
            t.segment.close()
            t.segment.unlink()
        elif t.arena and t.sent_upto == t.send_from:
            self.release(t.request_id)  # nothing was announced: nobody else can be reading it

    @property
    def num_pending(self) -> int:
        return len(self.transfers) + (len(self.arena.allocs) if self.arena else 0)

    def close(self) -> None:
        for rid in list(self.transfers):
            self.abort(rid)
        if self.arena is not None:
            self.arena.close()
            self.arena = None


# ---- decode side -----------------------------------------------------------------------------
@dataclass
class IncomingTransfer:
    request: object  # engine Request
    reuse_tokens: int
    created: float
    reserved: bool = False
    received: list[int] = field(default_factory=list)  # tokens landed per layer
    pending: list[tuple[object, tuple]] = field(default_factory=list)
    done: m.PrefillDone | None = None
    source: tuple[str, str, bool] | None = None  # (reply_to, shm name, arena?) of the sender's memory
    bytes_received: int = 0
    placements: dict = field(default_factory=dict)  # (token_start, n) -> slot runs or slot tensor


class KVReceiver:
    def __init__(self, scheduler, kv_caches, block_size: int, timeout_s: float = 60.0,
                 send: SendFn | None = None) -> None:
        self.scheduler = scheduler
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.timeout_s = timeout_s
        self.send = send
        self.num_layers = len(kv_caches)
        self.dtype = kv_caches[0][0].dtype
        self.device = kv_caches[0][0].device
        self.transfers: dict[str, IncomingTransfer] = {}
        self.orphans: dict[str, tuple[float, list]] = {}  # messages that beat their reservation
        self.recently_dropped: dict[str, float] = {}
        self.mapped: dict[str, shm.Segment] = {}  # arenas (kept mapped) and one-off segments in use
        self.buffered_bytes = 0
        self.bytes_received = 0
        self.transfer_seconds = 0.0
        self.num_done = 0
        self.num_failed = 0

    @property
    def num_active(self) -> int:
        return len(self.transfers)

    def reserve(self, request, reuse_tokens: int) -> str | None:
        """Start a transfer. Returns an error message when it can never succeed."""
        rid = request.request_id
        if rid in self.transfers or rid in self.scheduler.requests:
            return f"duplicate request id {rid!r}"
        if reuse_tokens:
            computed, _ = self.scheduler.block_manager.get_computed_blocks(request)
            if len(computed) * self.block_size < reuse_tokens:
                return "prefix no longer cached on the decode worker"
        t = IncomingTransfer(request, reuse_tokens, time.monotonic(), received=[reuse_tokens] * self.num_layers)
        self.transfers[rid] = t
        self._try_reserve(t)
        _, early = self.orphans.pop(rid, (0.0, []))
        for hdr, frames in early:
            self._accept(t, hdr, frames)
        return None

    def _try_reserve(self, t: IncomingTransfer) -> None:
        if not t.reserved:
            try:
                t.reserved = self.scheduler.reserve_remote(t.request, t.reuse_tokens)
            except ValueError as exc:
                log.warning("cannot reserve %s: %s", t.request.request_id, exc)

    def on_chunk(self, hdr: m.KVChunk, frames: tuple = ()) -> None:
        self._on_message(hdr, tuple(frames))

    def on_done(self, msg: m.PrefillDone) -> None:
        self._on_message(msg, ())

    def _on_message(self, hdr, frames: tuple) -> None:
        t = self.transfers.get(hdr.request_id)
        if t is not None:
            self._accept(t, hdr, frames)
            return
        if hdr.request_id in self.recently_dropped:
            self._discard([(hdr, frames)])
            return
        size = sum(len(f) for f in frames)
        if self.buffered_bytes + size > MAX_BUFFERED_BYTES:
            log.warning("dropping an early KV chunk for %s: buffer full", hdr.request_id)
            self._discard([(hdr, frames)])
            return
        self.buffered_bytes += size
        self.orphans.setdefault(hdr.request_id, (time.monotonic(), []))[1].append((hdr, frames))

    def _accept(self, t: IncomingTransfer, hdr, frames: tuple) -> None:
        if isinstance(hdr, m.PrefillDone):
            t.done = hdr
        else:
            if hdr.shm_name and t.source is None:
                t.source = (hdr.reply_to, hdr.shm_name, hdr.arena)
            if t.reserved:
                self._land(t, hdr, frames)
            else:
                t.pending.append((hdr, frames))

    def _segment(self, name: str, arena: bool) -> shm.Segment:
        seg = self.mapped.get(name)
        if seg is None:
            if arena:  # a restarted sender has a new arena: unmap its predecessor's
                owner = name.rsplit("-arena-", 1)[0]
                for old in [n for n in self.mapped if n.rsplit("-arena-", 1)[0] == owner and "-arena-" in n]:
                    self.mapped.pop(old).close()
            seg = self.mapped[name] = shm.Segment(name, populate=arena)  # arenas: map once, fault once
        return seg

    def _land(self, t: IncomingTransfer, hdr: m.KVChunk, frames: tuple) -> None:
        n, heads, dim = hdr.num_tokens, hdr.num_kv_heads, hdr.head_dim
        k_cache, v_cache = self.kv_caches[hdr.layer]
        if (heads, dim) != tuple(k_cache.shape[1:]):
            raise ValueError(f"KV shape mismatch: sender {heads}x{dim}, receiver {tuple(k_cache.shape[1:])}")
        src_dtype = _dtype(hdr.dtype)
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
            self.buffered_bytes = max(0, self.buffered_bytes - len(frames[0]) - len(frames[1]))
        k = k.view(n, heads, dim).to(device=self.device, dtype=self.dtype)
        v = v.view(n, heads, dim).to(device=self.device, dtype=self.dtype)
        key = (hdr.token_start, n)
        where = t.placements.get(key)
        if where is None:  # the same for every layer: work it out once
            blocks = self.scheduler.block_manager.blocks_of(t.request.request_id)
            end = hdr.token_start + n
            where = slot_runs(blocks, self.block_size, hdr.token_start, end)
            if where is None:
                where = token_slots(blocks, self.block_size, hdr.token_start, end).to(self.device)
            t.placements[key] = where
        if isinstance(where, list):
            for slot, off, length in where:
                k_cache[slot : slot + length].copy_(k[off : off + length])
                v_cache[slot : slot + length].copy_(v[off : off + length])
        else:
            k_cache.index_copy_(0, where, k)
            v_cache.index_copy_(0, where, v)
        t.received[hdr.layer] = max(t.received[hdr.layer], hdr.token_start + n)
        nbytes = 2 * count * src_dtype.itemsize
        t.bytes_received += nbytes
        self.bytes_received += nbytes

    def poll(self) -> list[str]:
        """Advance every transfer. Returns ids that failed (timed out); the caller reports them."""
        now = time.monotonic()
        failed: list[str] = []
        for rid, t in list(self.transfers.items()):
            if not t.reserved:
                self._try_reserve(t)
            if t.reserved and t.pending:
                pending, t.pending = t.pending, []
                for hdr, frames in pending:
                    self._land(t, hdr, frames)
            if t.reserved and t.done is not None and all(r >= t.done.token_end for r in t.received):
                del self.transfers[rid]
                self._release_source(t)
                if t.done.token_end != t.request.num_tokens:
                    self.scheduler.finish(rid)
                    self.num_failed += 1
                    failed.append(rid)
                    continue
                self.scheduler.admit_remote(rid, t.done.first_token)
                self.num_done += 1
                self.transfer_seconds += now - t.created
            elif now - t.created > self.timeout_s:
                log.warning("KV transfer for %s timed out after %.0fs", rid, self.timeout_s)
                failed.append(rid)
                self.drop(rid, failed=True)
        for rid, (born, msgs) in list(self.orphans.items()):
            if now - born > ORPHAN_TTL_S:
                del self.orphans[rid]
                self._discard(msgs)
        for rid, when in list(self.recently_dropped.items()):
            if now - when > ORPHAN_TTL_S:
                del self.recently_dropped[rid]
        return failed

    def drop(self, request_id: str, failed: bool = False) -> bool:
        """Abort: free the reservation and the sender's memory. True if there was a transfer."""
        self.recently_dropped[request_id] = time.monotonic()
        _, msgs = self.orphans.pop(request_id, (0.0, []))
        self._discard(msgs)
        t = self.transfers.pop(request_id, None)
        if t is None:
            return bool(msgs)
        self._discard(t.pending)
        self._release_source(t)
        if t.reserved:
            self.scheduler.finish(request_id)
        if failed:
            self.num_failed += 1
        return True

    def _release_source(self, t: IncomingTransfer) -> None:
        if t.source is None:
            return
        reply_to, name, arena = t.source
        t.source = None
        if arena:
            if self.send is not None and reply_to:
                self.send(reply_to, [m.encode(m.KVRelease(t.request.request_id))])
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

    def close(self) -> None:
        for rid in list(self.transfers) + list(self.orphans):
            self.drop(rid)
        for seg in self.mapped.values():
            seg.close()
        self.mapped.clear()
