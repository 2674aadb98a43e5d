"""The two halves of the KV connector.

Prefill side (`KVSender`): for each request whose decode happens elsewhere, after every layer of
every step, ship the KV of the tokens that step completed. Three ways, best first:
  * direct (same host, once the decode side's KVPlacement has arrived): copy straight into the
    decode worker's own KV cache, a shared-memory segment, at the blocks it reserved; a small
    notice follows. One copy in all.
  * arena (same host, before the placement arrives, or when the caches differ in dtype): copy
    into a region of a long-lived, pre-faulted shared-memory arena plus a notice; the decode
    side copies it into its blocks. Two copies.
  * TCP across hosts: on the raw data channel (`kv/tcp.py`), sent from the cache slots and
    received into the decode worker's reserved slots; ZeroMQ frames when a peer has no data port.
Sending happens between layers, so the transfer overlaps the rest of the forward pass, and the
request's blocks are free as soon as the prefill ends.

Decode side (`KVReceiver`): reserve blocks for the request (sharing any cached prefix), tell a
same-host prefill worker where to write, copy arriving arena/TCP chunks into the blocks (chunks
that beat the reservation wait in a bounded buffer), and when every layer covers every token and
the first token is known, hand the request to the scheduler and release the arena region.
Stalled transfers time out; aborted ones release everything. A placed transfer that ends before
its writer said PrefillDone or KVStopped keeps its blocks ("fenced") until the writer says so or
its process is gone: a late write must never land in a block that another request now owns.
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
from splitserve.kernels.fused import copy_rows
from splitserve.kv import shm, tcp

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
FENCE_MAX_S = 120.0  # a live writer that never answers: give the blocks back anyway, loudly


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


def paired_runs(src_blocks: list[int], src_bs: int, dst_blocks: list[int], dst_bs: int, start: int,
                end: int) -> list[tuple[int, int, int]] | None:
    """Tokens [start, end) as runs that are consecutive in both caches: (source slot, destination
    slot, length). The block sizes may differ. None when more than MAX_RUNS runs are needed."""
    runs: list[list[int]] = []
    pos = start
    while pos < end:
        s_off, d_off = pos % src_bs, pos % dst_bs
        n = min(src_bs - s_off, dst_bs - d_off, end - pos)
        src = src_blocks[pos // src_bs] * src_bs + s_off
        dst = dst_blocks[pos // dst_bs] * dst_bs + d_off
        last = runs[-1] if runs else None
        if last and last[0] + last[2] == src and last[1] + last[2] == dst:
            last[2] += n
        else:
            if len(runs) == MAX_RUNS:
                return None
            runs.append([src, dst, n])
        pos += n
    return [tuple(r) for r in runs]


def _process_alive(pid: int) -> bool:
    """Same host only: is this process still running (a writer into our cache, or its owner)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# ---- prefill side ----------------------------------------------------------------------------
@dataclass
class RemoteCache:
    """A decode worker's KV cache, mapped here: [layers, 2, slots, heads, head_dim]."""

    segment: shm.Segment
    view: torch.Tensor
    pid: int = 0  # the decode worker that owns it (same host)


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
    placed: bool = False  # the decode side sent a placement: end with PrefillDone or KVStopped
    dest: tuple[RemoteCache, list[int], int] | None = None  # (its cache, reserved blocks, block size)
    data_addr: str = ""  # tcp: the decode worker's raw data port
    conn: object = None  # tcp: the data connection its chunks went over
    lost: bool = False  # tcp: that connection broke: chunks may be lost, never claim PrefillDone
    announced: bool = False  # a chunk in shared memory was announced: the decode side releases it


@dataclass
class _StepSend:
    transfer: OutgoingTransfer
    start: int
    end: int
    slots: torch.Tensor | None  # source slots (arena/TCP, or a fragmented direct copy)
    runs: list[tuple[int, int, int]] | None = None  # direct: (source slot, destination slot, length)
    runs_t: torch.Tensor | None = None  # the same runs as an int64 [n, 3] tensor (one kernel call per layer)
    dst_slots: torch.Tensor | None = None  # direct, fragmented: scatter here
    src_runs: list[tuple[int, int, int]] | None = None  # tcp data channel: runs of our own slots
    table: list[int] | None = None  # our blocks for the request
    direct_from: int = 0  # first layer written directly (a placement can arrive mid-step)

    @property
    def direct(self) -> bool:
        return self.runs is not None or self.dst_slots is not None


class KVSender:
    def __init__(self, owner: str, kv_caches, block_size: int, send: SendFn, reply_to: str = "",
                 arena_bytes: int = DEFAULT_ARENA_BYTES, release_timeout_s: float = 180.0,
                 secret: bytes = b"") -> None:
        self.owner = owner
        self.secret = secret  # presented on the raw TCP data channel
        self.data: dict[str, tcp.DataSender] = {}
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
        self.bytes_direct = 0
        self.remote_caches: dict[str, RemoteCache] = {}
        self.early_placements: dict[str, tuple[float, m.KVPlacement]] = {}  # beat their PrefillRequest
        self.ended: dict[str, tuple[float, bool]] = {}  # recently ended here: (when, without PrefillDone?)
        # Set by the worker: take placements that arrived since the step began (between layers),
        # so a one-step prefill still writes most layers directly.
        self.fetch_placements: Callable[[], None] | None = None
        self._checked_caches = 0.0
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

    def add(self, request_id: str, dest_addr: str, send_from: int, transport: str, total_tokens: int,
            data_addr: str = "") -> None:
        t = self.transfers[request_id] = OutgoingTransfer(request_id, dest_addr, send_from, transport, total_tokens,
                                                          sent_upto=send_from,
                                                          data_addr=data_addr if transport == "tcp" else "")
        early = self.early_placements.pop(request_id, None)
        if early is not None:
            self._apply_placement(t, early[1])
        if t.data_addr:
            self._data(t)  # connect now, between steps, not in the middle of a forward pass

    # ---- direct writes into the decode worker's cache ----------------------------------------
    def place(self, msg: m.KVPlacement) -> None:
        """The decode side reserved blocks and says where they are."""
        t = self.transfers.get(msg.request_id)
        if t is not None:
            self._apply_placement(t, msg)
        elif msg.request_id in self.ended:  # a placement that lost the race with the prefill
            if self.ended[msg.request_id][1]:
                self.send(msg.reply_to, [m.encode(m.KVStopped(msg.request_id))])
        else:
            self.early_placements[msg.request_id] = (time.monotonic(), msg)

    def _apply_placement(self, t: OutgoingTransfer, msg: m.KVPlacement) -> None:
        t.placed = True
        same = (msg.dtype == _dtype_name(self.dtype) and msg.num_layers == self.num_layers
                and (msg.num_kv_heads, msg.head_dim) == (self.num_kv_heads, self.head_dim))
        blocks_fit = msg.block_size > 0 and all(0 <= b < msg.num_slots // msg.block_size for b in msg.block_ids)
        if not (same and blocks_fit and len(msg.block_ids) * msg.block_size >= t.total_tokens):
            return  # stays on the arena path; the decode side converts what it receives
        cache = self._map(msg)
        if cache is not None:
            t.dest = (cache, list(msg.block_ids), msg.block_size)

    def _map(self, msg: m.KVPlacement) -> RemoteCache | None:
        cache = self.remote_caches.get(msg.cache_name)
        if cache is not None:
            return cache
        owner = msg.cache_name.rsplit("-kvcache-", 1)[0]
        for name in [n for n in self.remote_caches if n.rsplit("-kvcache-", 1)[0] == owner]:
            self._unmap(name)  # that decode worker restarted: its old cache is gone
        try:
            seg = shm.Segment(msg.cache_name)
        except (OSError, ValueError) as exc:
            log.warning("cannot map %s (%s): sending through the arena", msg.cache_name, exc)
            return None
        shape = (msg.num_layers, 2, msg.num_slots, msg.num_kv_heads, msg.head_dim)
        count = shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
        if seg.size < count * self.dtype.itemsize:
            seg.close()
            log.warning("%s is smaller than its placement says: sending through the arena", msg.cache_name)
            return None
        view = torch.frombuffer(seg.buf, dtype=self.dtype, count=count).view(shape)
        cache = self.remote_caches[msg.cache_name] = RemoteCache(seg, view, msg.pid)
        return cache

    def _unmap(self, name: str) -> None:
        cache = self.remote_caches.pop(name)
        for t in self.transfers.values():
            if t.dest is not None and t.dest[0] is cache:
                t.dest = None
        cache.view = None
        cache.segment.close()

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
            table = block_tables[chunk.request_id]
            device = self.kv_caches[0][0].device
            if t.dest is not None:
                s = _StepSend(t, t.sent_upto, end, None, table=table)
                self._go_direct(s, 0)
                self._step.append(s)
            else:
                runs = None
                if t.data_addr and device.type == "cpu":
                    runs = slot_runs(table, self.block_size, t.sent_upto, end)
                slots = None if runs is not None else token_slots(table, self.block_size, t.sent_upto, end).to(device)
                self._step.append(_StepSend(t, t.sent_upto, end, slots, src_runs=runs, table=table))
            t.sent_upto = end

    def _go_direct(self, s: _StepSend, layer: int) -> None:
        """Write this step's tokens straight into the decode cache from `layer` on."""
        t = s.transfer
        _, dst_blocks, dst_bs = t.dest
        s.direct_from = layer
        s.runs = paired_runs(s.table, self.block_size, dst_blocks, dst_bs, s.start, s.end)
        if s.runs is not None:
            s.runs_t = torch.tensor(s.runs, dtype=torch.long).view(-1, 3)
        else:
            if s.slots is None:
                s.slots = token_slots(s.table, self.block_size, s.start, s.end).to(self.kv_caches[0][0].device)
            s.dst_slots = token_slots(dst_blocks, dst_bs, s.start, s.end)

    def on_layer(self, layer: int) -> None:
        if self.fetch_placements is not None and any(
                not s.direct and not s.transfer.placed and s.transfer.transport == "shm" for s in self._step):
            self.fetch_placements()
            for s in self._step:
                if not s.direct and s.transfer.dest is not None:
                    self._go_direct(s, layer)
        k_cache, v_cache = self.kv_caches[layer]
        for s in self._step:
            t = s.transfer
            n = s.end - s.start
            hdr = m.KVChunk(t.request_id, layer, s.start, n, self.num_kv_heads, self.head_dim,
                            _dtype_name(self.dtype), self.reply_to)
            if s.direct:
                if t.dest is None:  # its decode worker restarted meanwhile: nobody to write for
                    continue
                dest = t.dest[0].view
                dk, dv = dest[layer, 0], dest[layer, 1]
                if s.runs is not None:
                    copy_rows(dk, k_cache, s.runs, s.runs_t)
                    copy_rows(dv, v_cache, s.runs, s.runs_t)
                else:
                    dk.index_copy_(0, s.dst_slots, k_cache.index_select(0, s.slots).cpu())
                    dv.index_copy_(0, s.dst_slots, v_cache.index_select(0, s.slots).cpu())
                if layer == self.num_layers - 1:  # the decode side only needs to know when all landed
                    hdr.layer, hdr.num_layers_covered, hdr.direct = s.direct_from, layer + 1 - s.direct_from, True
                    self.send(t.dest_addr, [m.encode(hdr)])
                self.bytes_direct += n * self.token_bytes
            elif t.data_addr and self._data(t) is not None:
                if t.lost:
                    continue
                if s.src_runs is not None:  # straight from our cache slots into the socket
                    kp = [k_cache[a : a + length].view(torch.uint8).numpy() for a, _, length in s.src_runs]
                    vp = [v_cache[a : a + length].view(torch.uint8).numpy() for a, _, length in s.src_runs]
                else:
                    kp = [k_cache.index_select(0, s.slots).cpu().view(torch.uint8).numpy()]
                    vp = [v_cache.index_select(0, s.slots).cpu().view(torch.uint8).numpy()]
                conn = self.data[t.data_addr]
                conn.send(tcp.frame_buffers(hdr, kp, vp))
                if conn.broken:
                    t.lost = True
            elif t.transport == "shm":
                if t.view is None:  # opened on first use: a placement may make it unnecessary
                    self._open_shm(t)
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
                t.announced = True
            else:
                k = k_cache.index_select(0, s.slots).cpu()
                v = v_cache.index_select(0, s.slots).cpu()
                self.send(t.dest_addr, [m.encode(hdr), k.view(torch.uint8).numpy(), v.view(torch.uint8).numpy()])
            t.bytes_sent += n * self.token_bytes
            self.bytes_sent += n * self.token_bytes

    def end_step(self) -> None:
        self._step = []
        self.flush_data()

    # ---- the raw TCP data channel ------------------------------------------------------------
    def _data(self, t: OutgoingTransfer) -> tcp.DataSender | None:
        conn = self.data.get(t.data_addr)
        if conn is not None and conn.broken:
            conn.close()
            del self.data[t.data_addr]
            conn = None
        if conn is None:
            try:
                conn = self.data[t.data_addr] = tcp.DataSender(t.data_addr, self.secret)
            except OSError as exc:
                log.warning("no KV data connection to %s (%s): sending ZeroMQ frames", t.data_addr, exc)
                t.data_addr = ""
                t.lost = t.conn is not None
                return None
        if t.conn is None:
            t.conn = conn
        elif t.conn is not conn:  # its earlier chunks went over a connection that broke
            t.lost = True
        return conn

    def flush_data(self) -> None:
        for conn in self.data.values():
            if conn.wants_write:
                conn.flush()

    def data_waiting(self) -> list[int]:
        """File descriptors with queued bytes: poll them for writability."""
        return [c.fileno() for c in self.data.values() if c.wants_write]

    def finish(self, request_id: str, first_token: int | None) -> None:
        """The prefill ended. Tell the decode side (unless the request ended here) and forget the
        transfer; its shared memory now waits for the decode side's release (or its unlink)."""
        t = self.transfers.pop(request_id, None)
        if t is None:
            return
        if t.conn is not None and (t.conn.broken or self.data.get(t.data_addr) is not t.conn):
            t.lost = True
        if first_token is not None and t.sent_upto >= t.total_tokens and not t.lost:
            self.send(t.dest_addr, [m.encode(m.PrefillDone(request_id, first_token, self.num_layers, t.total_tokens))])
            self.ended[request_id] = (time.monotonic(), False)
            t.view = t.dest = None
            if not t.announced:  # it all went directly: the decode side will never release a region
                self._drop_unannounced(t)
            elif t.segment is not None:
                t.segment.close()
        else:
            self._drop(t)

    def abort(self, request_id: str) -> None:
        t = self.transfers.pop(request_id, None)
        if t is not None:
            self._drop(t)
        early = self.early_placements.pop(request_id, None)
        if early is not None:
            self.send(early[1].reply_to, [m.encode(m.KVStopped(request_id))])
            self.ended[request_id] = (time.monotonic(), True)
        # A region already handed over stays until the decode side releases it or it times out:
        # freeing it now could hand the bytes to another transfer while the decode side reads.

    def release(self, request_id: str) -> None:
        if self.arena is not None:
            self.arena.release(request_id)

    def poll(self) -> None:
        now = time.monotonic()
        if self.remote_caches and now - self._checked_caches > 1.0:
            self._checked_caches = now
            for name, cache in list(self.remote_caches.items()):
                if cache.pid and not _process_alive(cache.pid):  # its decode worker is gone
                    self._unmap(name)
        if self.arena is not None and self.arena.allocs:
            for rid in self.arena.reclaim(now - self.release_timeout_s):
                log.warning("reclaimed the arena region of %s: no release from the decode side", rid)
        for rid, (born, msg) in list(self.early_placements.items()):
            if now - born > ORPHAN_TTL_S:  # its PrefillRequest never came: free the decode side's blocks
                del self.early_placements[rid]
                self.send(msg.reply_to, [m.encode(m.KVStopped(rid))])
        for rid, (when, _) in list(self.ended.items()):
            if now - when > ORPHAN_TTL_S:
                del self.ended[rid]

    def _drop(self, t: OutgoingTransfer) -> None:
        # Tell the decode side no write will follow, so it can free blocks it holds for us.
        self.send(t.dest_addr, [m.encode(m.KVStopped(t.request_id))])
        self.ended[t.request_id] = (time.monotonic(), True)
        t.view = t.dest = None
        if t.segment is not None:
            t.segment.close()
            t.segment.unlink()
        elif not t.announced:
            self._drop_unannounced(t)

    def _drop_unannounced(self, t: OutgoingTransfer) -> None:
        """Shared memory that no notice pointed at: nobody else can be reading it."""
        if t.segment is not None:
            t.segment.close()
            t.segment.unlink()
        elif t.arena:
            self.release(t.request_id)

    @property
    def num_pending(self) -> int:
        return len(self.transfers) + len(self.early_placements) + (len(self.arena.allocs) if self.arena else 0)

    def close(self) -> None:
        for rid in list(self.transfers) + list(self.early_placements):
            self.abort(rid)
        for name in list(self.remote_caches):
            self._unmap(name)
        for conn in self.data.values():
            conn.close()
        self.data.clear()
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
    writer: str = ""  # same-host prefill worker to offer a placement to
    writer_pid: int = 0
    placed: bool = False  # it may write into our blocks until PrefillDone or KVStopped
    stopped: bool = False  # KVStopped came: no more writes
    gap: bool = False  # a chunk started past what had arrived for its layer: some KV was lost
    placements: dict = field(default_factory=dict)  # (token_start, n) -> slot runs or slot tensor


class KVReceiver:
    def __init__(self, scheduler, kv_caches, block_size: int, timeout_s: float = 60.0,
                 send: SendFn | None = None, shared_cache: str | None = None, reply_to: str = "",
                 data_host: str | None = None, secret: bytes = b"") -> None:
        """`shared_cache`: the shared-memory segment holding `kv_caches` (CPU), offered to same-host
        prefill workers as a write target; `reply_to`: this worker's inbox; `data_host`: open a
        raw TCP data port there (CPU caches), guarded by `secret`."""
        self.scheduler = scheduler
        self.shared_cache = shared_cache
        self.reply_to = reply_to
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
        self.fenced: dict[str, tuple[float, int]] = {}  # dropped, writer may still write: (since, its pid)
        self.data: tcp.DataReceiver | None = None
        if data_host is not None and self.device.type == "cpu":
            self.data = tcp.DataReceiver(data_host, secret, self._tcp_place, self._tcp_landed, self._tcp_still_placed)
        self.buffered_bytes = 0
        self.bytes_received = 0
        self.transfer_seconds = 0.0
        self.num_done = 0
        self.num_failed = 0

    @property
    def num_active(self) -> int:
        return len(self.transfers)

    @property
    def busy(self) -> bool:
        return bool(self.transfers or self.orphans or self.fenced)

    def reserve(self, request, reuse_tokens: int, writer: str = "", writer_pid: int = 0) -> str | None:
        """Start a transfer. Returns an error message when it can never succeed. `writer`: the
        prefill worker's inbox when it shares this host (it gets a KVPlacement once blocks are held)."""
        rid = request.request_id
        if rid in self.transfers or rid in self.scheduler.requests:
            return f"duplicate request id {rid!r}"
        if reuse_tokens:
            computed, _ = self.scheduler.block_manager.get_computed_blocks(request)
            if len(computed) * self.block_size < reuse_tokens:
                return "prefix no longer cached on the decode worker"
        t = IncomingTransfer(request, reuse_tokens, time.monotonic(), received=[reuse_tokens] * self.num_layers)
        if writer and self.shared_cache and self.send is not None:
            t.writer, t.writer_pid = writer, writer_pid
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
            if t.reserved and t.writer and not t.stopped and t.done is None:
                self._offer_placement(t)

    def _offer_placement(self, t: IncomingTransfer) -> None:
        k0 = self.kv_caches[0][0]
        rid = t.request.request_id
        self.send(t.writer, [m.encode(m.KVPlacement(
            rid, self.shared_cache, self.num_layers, k0.shape[0], k0.shape[1], k0.shape[2], _dtype_name(self.dtype),
            self.block_size, list(self.scheduler.block_manager.blocks_of(rid)), self.reply_to, os.getpid()))])
        t.placed = True

    def on_chunk(self, hdr: m.KVChunk, frames: tuple = ()) -> None:
        self._on_message(hdr, tuple(frames))

    def on_done(self, msg: m.PrefillDone) -> None:
        self._on_message(msg, ())

    def on_stopped(self, request_id: str) -> None:
        """The writer will not write again for this request."""
        t = self.transfers.get(request_id)
        if t is not None:
            t.stopped = True
        else:
            self._unfence(request_id)

    def _on_message(self, hdr, frames: tuple) -> None:
        t = self.transfers.get(hdr.request_id)
        if t is not None:
            self._accept(t, hdr, frames)
            return
        if isinstance(hdr, m.PrefillDone) and self._unfence(hdr.request_id):
            return  # dropped here first; the writer has now finished
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

    # ---- the raw TCP data channel: receive into our own slots --------------------------------
    def _tcp_place(self, hdr: m.KVChunk):
        t = self.transfers.get(hdr.request_id)
        k_cache, v_cache = self.kv_caches[0]
        if (t is None or not t.reserved or hdr.dtype != _dtype_name(self.dtype) or not 0 <= hdr.layer < self.num_layers
                or (hdr.num_kv_heads, hdr.head_dim) != tuple(k_cache.shape[1:])
                or hdr.token_start + hdr.num_tokens > t.request.num_tokens or hdr.token_start < t.reuse_tokens):
            return None  # lands in a scratch buffer and takes the usual path (buffer, convert or reject)
        where = self._placement(t, hdr.token_start, hdr.num_tokens)
        if not isinstance(where, list):
            return None
        k_cache, v_cache = self.kv_caches[hdr.layer]
        ks = [k_cache[slot : slot + length].view(torch.uint8).numpy() for slot, _, length in where]
        vs = [v_cache[slot : slot + length].view(torch.uint8).numpy() for slot, _, length in where]
        return ks, vs

    def _tcp_still_placed(self, hdr: m.KVChunk) -> bool:
        t = self.transfers.get(hdr.request_id)
        return t is not None and t.reserved

    def _tcp_landed(self, hdr: m.KVChunk, scratch) -> None:
        if scratch is not None:
            self._on_message(hdr, scratch)
            return
        t = self.transfers[hdr.request_id]
        self._cover(t, hdr.layer, hdr.token_start, hdr.num_tokens)
        nbytes = 2 * tcp.chunk_bytes(hdr)
        t.bytes_received += nbytes
        self.bytes_received += nbytes

    def _placement(self, t: IncomingTransfer, start: int, n: int):
        """Where tokens [start, start + n) go: slot runs, or a slot tensor when fragmented."""
        key = (start, n)
        where = t.placements.get(key)
        if where is None:  # the same for every layer: work it out once
            blocks = self.scheduler.block_manager.blocks_of(t.request.request_id)
            where = slot_runs(blocks, self.block_size, start, start + n)
            if where is None:
                where = token_slots(blocks, self.block_size, start, start + n).to(self.device)
            t.placements[key] = where
        return where

    @staticmethod
    def _cover(t: IncomingTransfer, layer: int, start: int, n: int) -> None:
        """Chunks of a layer arrive in token order; one that starts past the covered end means
        an earlier one was lost (a broken data connection): fail the transfer, never admit it."""
        if start > t.received[layer]:
            t.gap = True
        t.received[layer] = max(t.received[layer], start + n)

    def _land(self, t: IncomingTransfer, hdr: m.KVChunk, frames: tuple) -> None:
        n, heads, dim = hdr.num_tokens, hdr.num_kv_heads, hdr.head_dim
        if not 0 <= hdr.layer < self.num_layers or n <= 0 or hdr.token_start < 0:
            raise ValueError(f"bad KV chunk: layer {hdr.layer}, tokens {hdr.token_start}+{n}")
        if hdr.direct:  # already in our blocks: just count it
            if not t.placed:
                raise ValueError("a direct KV chunk for a transfer without a placement")
            layers = range(hdr.layer, min(hdr.layer + hdr.num_layers_covered, self.num_layers))
            for layer in layers:
                self._cover(t, layer, hdr.token_start, n)
            nbytes = 2 * n * heads * dim * _dtype(hdr.dtype).itemsize * len(layers)
            t.bytes_received += nbytes
            self.bytes_received += nbytes
            return
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
        where = self._placement(t, hdr.token_start, n)
        if isinstance(where, list):
            for slot, off, length in where:
                k_cache[slot : slot + length].copy_(k[off : off + length])
                v_cache[slot : slot + length].copy_(v[off : off + length])
        else:
            k_cache.index_copy_(0, where, k)
            v_cache.index_copy_(0, where, v)
        self._cover(t, hdr.layer, hdr.token_start, n)
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
            if t.gap:
                log.warning("KV for %s arrived with a hole (a data connection broke): failing it", rid)
                failed.append(rid)
                self.drop(rid, failed=True)
                continue
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
        if self.data is not None and self.data.conns:
            self.data.expire()
        for rid, (since, pid) in list(self.fenced.items()):
            alive = _process_alive(pid) if pid else True
            if not alive or now - since > FENCE_MAX_S:
                if alive:
                    log.warning("freeing the blocks of %s: its writer never said it stopped", rid)
                self._unfence(rid)
        return failed

    def _unfence(self, request_id: str) -> bool:
        """The writer can no longer write: free the blocks kept for it. False if none were kept."""
        if self.fenced.pop(request_id, None) is None:
            return False
        self.scheduler.finish(request_id)
        return True

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
            if t.placed and t.done is None and not t.stopped:
                self.fenced[request_id] = (time.monotonic(), t.writer_pid)  # freed when the writer stops
            else:
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
        for rid in list(self.fenced):  # shutting down: nobody will reuse these blocks
            self._unfence(rid)
        for seg in self.mapped.values():
            seg.close()
        self.mapped.clear()
        if self.data is not None:
            self.data.close()
            self.data = None
