"""The two halves of the KV connector.

Prefill side (`KVSender`): for each request whose decode happens elsewhere, after every layer of
every step, copy the KV of the tokens that step completed into the wire format and send it
(shared memory + a small notice, or the bytes themselves over TCP). Sending happens between
layers, so the transfer overlaps the rest of the forward pass; no blocks are held afterwards.

Decode side (`KVReceiver`): reserve blocks for the request (sharing any cached prefix), copy
arriving chunks into them (chunks that arrive before the reservation wait in a bounded buffer),
and when every layer covers every token and the first token is known, hand the request to the
scheduler. Stalled transfers time out; aborted ones release everything on both sides.
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported KV dtype {name!r}")
    return dt


def token_slots(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(block_ids, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


# ---- prefill side ----------------------------------------------------------------------------
@dataclass
class OutgoingTransfer:
    request_id: str
    dest_addr: str
    send_from: int
    transport: str
    total_tokens: int  # tokens whose KV the decode worker needs: [send_from, total_tokens)
    sent_upto: int
    segment: shm.Segment | None = None
    shm_view: torch.Tensor | None = None  # [layers, tokens, 2, heads, head_dim]
    bytes_sent: int = 0


@dataclass
class _StepSend:
    transfer: OutgoingTransfer
    start: int
    end: int
    slots: torch.Tensor


class KVSender:
    def __init__(self, cluster_id: str, kv_caches, block_size: int, send: SendFn) -> None:
        self.cluster_id = cluster_id
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.send = send
        self.transfers: dict[str, OutgoingTransfer] = {}
        self._step: list[_StepSend] = []
        self.bytes_sent = 0
        k0 = kv_caches[0][0]
        self.num_layers = len(kv_caches)
        self.num_kv_heads, self.head_dim = k0.shape[1], k0.shape[2]
        self.dtype = k0.dtype
        self.token_bytes = 2 * self.num_kv_heads * self.head_dim * k0.element_size()

    def add(self, request_id: str, dest_addr: str, send_from: int, transport: str, total_tokens: int) -> None:
        self.transfers[request_id] = OutgoingTransfer(request_id, dest_addr, send_from, transport, total_tokens,
                                                      sent_upto=send_from)

    @property
    def active(self) -> bool:
        return bool(self._step)

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
                continue
            start = t.sent_upto
            if t.transport == "shm" and t.segment is None:
                n = t.total_tokens - t.send_from
                t.segment = shm.Segment(shm.segment_name(self.cluster_id, t.request_id),
                                        size=self.num_layers * n * self.token_bytes)
                flat = torch.frombuffer(t.segment.buf, dtype=self.dtype)
                t.shm_view = flat.view(self.num_layers, n, 2, self.num_kv_heads, self.head_dim)
            slots = token_slots(block_tables[chunk.request_id], self.block_size, start, end)
            self._step.append(_StepSend(t, start, end, slots.to(self.kv_caches[0][0].device)))
            t.sent_upto = end

    def on_layer(self, layer: int) -> None:
        k_cache, v_cache = self.kv_caches[layer]
        for s in self._step:
            t = s.transfer
            n = s.end - s.start
            hdr = m.KVChunk(t.request_id, layer, s.start, n, self.num_kv_heads, self.head_dim,
                            _dtype_name(self.dtype))
            if t.transport == "shm":
                dst = t.shm_view[layer, s.start - t.send_from : s.end - t.send_from]
                dst[:, 0].copy_(k_cache.index_select(0, s.slots))
                dst[:, 1].copy_(v_cache.index_select(0, s.slots))
                hdr.shm_name = t.segment.name
                hdr.shm_offset = (layer * (t.total_tokens - t.send_from) + s.start - t.send_from) * self.token_bytes
                self.send(t.dest_addr, [m.encode(hdr)])
            else:
                payload = torch.stack((k_cache.index_select(0, s.slots), v_cache.index_select(0, s.slots)), dim=1)
                self.send(t.dest_addr, [m.encode(hdr), payload.cpu().contiguous().view(torch.uint8).numpy()])
            t.bytes_sent += n * self.token_bytes
            self.bytes_sent += n * self.token_bytes

    def end_step(self) -> None:
        self._step = []

    def finish(self, request_id: str, first_token: int | None) -> None:
        """The prefill finished: tell the decode side (unless the request ended here) and forget it.
        The decode side owns the segment from now on and unlinks it once copied."""
        t = self.transfers.pop(request_id, None)
        if t is None:
            return
        if first_token is not None and t.sent_upto >= t.total_tokens:
            self.send(t.dest_addr, [m.encode(m.PrefillDone(request_id, first_token, self.num_layers, t.total_tokens))])
            if t.segment is not None:
                t.shm_view = None
                t.segment.close()
        else:
            self._drop(t)

    def abort(self, request_id: str) -> None:
        t = self.transfers.pop(request_id, None)
        if t is not None:
            self._drop(t)

    def _drop(self, t: OutgoingTransfer) -> None:
        if t.segment is not None:
            t.shm_view = None
            t.segment.close()
            t.segment.unlink()

    def close(self) -> None:
        for rid in list(self.transfers):
            self.abort(rid)


# ---- decode side -----------------------------------------------------------------------------
@dataclass
class IncomingTransfer:
    request: object  # engine Request
    reuse_tokens: int
    created: float
    reserved: bool = False
    received: list[int] = field(default_factory=list)  # tokens landed per layer
    pending: list[tuple[m.KVChunk, object]] = field(default_factory=list)
    done: m.PrefillDone | None = None
    segment: shm.Segment | None = None
    bytes_received: int = 0


class KVReceiver:
    def __init__(self, scheduler, kv_caches, block_size: int, timeout_s: float = 60.0) -> None:
        self.scheduler = scheduler
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.timeout_s = timeout_s
        self.num_layers = len(kv_caches)
        self.dtype = kv_caches[0][0].dtype
        self.device = kv_caches[0][0].device
        self.transfers: dict[str, IncomingTransfer] = {}
        self.orphans: dict[str, tuple[float, list]] = {}  # chunks that beat their reservation
        self.recently_dropped: dict[str, float] = {}
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
        bm = self.scheduler.block_manager
        if reuse_tokens:
            computed, _ = bm.get_computed_blocks(request)
            if len(computed) * self.block_size < reuse_tokens:
                return "prefix no longer cached on the decode worker"
        t = IncomingTransfer(request, reuse_tokens, time.monotonic(), received=[reuse_tokens] * self.num_layers)
        self.transfers[rid] = t
        _, chunks = self.orphans.pop(rid, (0.0, []))
        for hdr, payload in chunks:
            self.on_chunk(hdr, payload)
        self._try_reserve(t)
        return None

    def _try_reserve(self, t: IncomingTransfer) -> None:
        if t.reserved:
            return
        try:
            t.reserved = self.scheduler.reserve_remote(t.request, t.reuse_tokens)
        except ValueError as exc:
            log.warning("cannot reserve %s: %s", t.request.request_id, exc)
            return

    def on_chunk(self, hdr: m.KVChunk, payload) -> None:
        t = self.transfers.get(hdr.request_id)
        if t is None:
            if hdr.request_id in self.recently_dropped:
                if hdr.shm_name:
                    shm.unlink(hdr.shm_name)
                return
            size = 0 if payload is None else len(payload)
            if self.buffered_bytes + size > MAX_BUFFERED_BYTES:
                log.warning("dropping an early KV chunk for %s: buffer full", hdr.request_id)
                return
            self.buffered_bytes += size
            self.orphans.setdefault(hdr.request_id, (time.monotonic(), []))[1].append((hdr, payload))
            return
        if t.reserved:
            self._land(t, hdr, payload)
        else:
            t.pending.append((hdr, payload))

    def on_done(self, msg: m.PrefillDone) -> None:
        t = self.transfers.get(msg.request_id)
        if t is not None:
            t.done = msg
        elif msg.request_id not in self.recently_dropped:
            self.orphans.setdefault(msg.request_id, (time.monotonic(), []))[1].append((msg, None))

    def _land(self, t: IncomingTransfer, hdr, payload) -> None:
        if isinstance(hdr, m.PrefillDone):
            t.done = hdr
            return
        n, heads, dim = hdr.num_tokens, hdr.num_kv_heads, hdr.head_dim
        k_cache, v_cache = self.kv_caches[hdr.layer]
        if (heads, dim) != tuple(k_cache.shape[1:]):
            raise ValueError(f"KV shape mismatch: sender {heads}x{dim}, receiver {tuple(k_cache.shape[1:])}")
        src_dtype = _dtype(hdr.dtype)
        count = n * 2 * heads * dim
        if hdr.shm_name:
            if t.segment is None:
                t.segment = shm.Segment(hdr.shm_name)
            data = torch.frombuffer(t.segment.buf, dtype=src_dtype, count=count, offset=hdr.shm_offset)
        else:
            data = torch.frombuffer(payload, dtype=src_dtype, count=count)
            self.buffered_bytes = max(0, self.buffered_bytes - len(payload))
        data = data.view(n, 2, heads, dim).to(device=self.device, dtype=self.dtype)
        req = t.request
        blocks = self.scheduler.block_manager.blocks_of(req.request_id)
        slots = token_slots(blocks, self.block_size, hdr.token_start, hdr.token_start + n).to(self.device)
        k_cache.index_copy_(0, slots, data[:, 0])
        v_cache.index_copy_(0, slots, data[:, 1])
        t.received[hdr.layer] = max(t.received[hdr.layer], hdr.token_start + n)
        nbytes = count * data.element_size()
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
                for hdr, payload in pending:
                    self._land(t, hdr, payload)
            req = t.request
            if t.reserved and t.done is not None and all(r >= t.done.token_end for r in t.received):
                if t.done.token_end != req.num_tokens:
                    failed.append(rid)
                    self.drop(rid, failed=True)
                    continue
                self._release_segment(t)
                del self.transfers[rid]
                self.scheduler.admit_remote(rid, t.done.first_token)
                self.num_done += 1
                self.transfer_seconds += now - t.created
            elif now - t.created > self.timeout_s:
                log.warning("KV transfer for %s timed out after %.0fs", rid, self.timeout_s)
                failed.append(rid)
                self.drop(rid, failed=True)
        for rid, (born, chunks) in list(self.orphans.items()):
            if now - born > ORPHAN_TTL_S:
                self._discard_chunks(chunks)
                del self.orphans[rid]
        for rid, when in list(self.recently_dropped.items()):
            if now - when > ORPHAN_TTL_S:
                del self.recently_dropped[rid]
        return failed

    def drop(self, request_id: str, failed: bool = False) -> bool:
        """Abort: free the reservation and the segment. True if there was a transfer."""
        self.recently_dropped[request_id] = time.monotonic()
        _, chunks = self.orphans.pop(request_id, (0.0, []))
        self._discard_chunks(chunks)
        t = self.transfers.pop(request_id, None)
        if t is None:
            return False
        self._discard_chunks(t.pending)
        if t.segment is None:
            names = {h.shm_name for h, _ in t.pending if isinstance(h, m.KVChunk) and h.shm_name}
            for name in names:
                shm.unlink(name)
        self._release_segment(t)
        if t.reserved:
            self.scheduler.finish(request_id)
        if failed:
            self.num_failed += 1
        return True

    def _discard_chunks(self, chunks) -> None:
        for hdr, payload in chunks:
            if isinstance(hdr, m.KVChunk) and hdr.shm_name:
                shm.unlink(hdr.shm_name)
            if payload is not None:
                self.buffered_bytes = max(0, self.buffered_bytes - len(payload))

    @staticmethod
    def _release_segment(t: IncomingTransfer) -> None:
        if t.segment is not None:
            t.segment.close()
            t.segment.unlink()
            t.segment = None

    def close(self) -> None:
        for rid in list(self.transfers):
            self.drop(rid)
        for rid in list(self.orphans):
            self.drop(rid)
