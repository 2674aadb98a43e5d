"""Prefill side of the KV handoff (`KVSender`): ship each layer's KV as soon as it is computed.

For each request whose decode happens elsewhere, after every layer of every step, the tokens that
step completed leave by the transfer's path (`kv/transports.py`: shared memory direct or staged,
the raw TCP data channel, or ZeroMQ frames), so the transfer overlaps the rest of the forward pass
and the request's blocks are free as soon as the prefill ends. A transfer ends with PrefillDone
(every token shipped, first token known) or KVStopped: a decode worker that offered its blocks
keeps them until it hears one of the two.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from splitserve.cluster import messages as m
from splitserve.kv import shm, tcp
from splitserve.kv.handoff import HandoffTimeouts
from splitserve.kv.layout import KVSide, dtype_name, process_alive
from splitserve.kv.transports import DataPath, FramesPath, KVPath, RemoteCache, ShmPath, StepSend

log = logging.getLogger("splitserve.kv")

SendFn = Callable[[str, list], None]  # (destination address, frames after the secret)
DEFAULT_ARENA_BYTES = 256 * 1024 * 1024


class TxState(enum.Enum):
    SENDING = "sending"  # no placement: staged or over TCP
    PLACED = "placed"  # the decode side offered its blocks: must end with PrefillDone or KVStopped


@dataclass
class OutgoingTransfer:
    request_id: str
    dest_addr: str
    send_from: int
    total_tokens: int  # the decode side needs tokens [send_from, total_tokens)
    sent_upto: int
    path: KVPath  # ShmPath, DataPath or FramesPath, chosen once
    dest_pid: int = 0  # same host: the decode worker's process (0: not known)
    state: TxState = TxState.SENDING
    bytes_sent: int = 0
    send_seconds: float = 0.0  # time spent moving its KV (copies, socket sends)


class KVSender(KVSide):
    def __init__(self, owner: str, kv_caches, block_size: int, send: SendFn, reply_to: str = "",
                 arena_bytes: int = DEFAULT_ARENA_BYTES, timeouts: HandoffTimeouts = HandoffTimeouts(),
                 secret: bytes = b"", poll_inbox: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`poll_inbox`: read the inbox between layers and apply KVPlacements that arrived since
        the step began (so a one-step prefill still writes most layers directly)."""
        super().__init__(kv_caches, block_size, send, reply_to, secret, clock)
        self.owner = owner
        self.data: dict[str, tcp.DataSender] = {}
        self.arena_bytes = arena_bytes
        self.timeouts = timeouts
        self.poll_inbox = poll_inbox
        self.arena: shm.Arena | None = None
        self.transfers: dict[str, OutgoingTransfer] = {}
        self._step: list[StepSend] = []
        self.bytes_sent = 0
        self.bytes_direct = 0
        self.remote_caches: dict[str, RemoteCache] = {}
        self.early_placements: dict[str, tuple[float, m.KVPlacement]] = {}  # beat their PrefillRequest
        self.ended: dict[str, tuple[float, bool]] = {}  # recently ended here: (when, without PrefillDone?)
        self._checked_readers = 0.0

    def ensure_arena(self) -> None:
        if self.arena is None and self.arena_bytes > 0:
            self.arena = shm.Arena(shm.segment_name(self.owner, f"arena-{os.getpid()}"), self.arena_bytes)

    def add(self, request_id: str, dest_addr: str, send_from: int, transport: str, total_tokens: int,
            data_addr: str = "", dest_pid: int = 0) -> None:
        """Start a transfer; its path is chosen here, once. `dest_pid`: the decode worker's
        process (same host), so its arena region can be freed if that process dies."""
        path: KVPath
        if transport == "shm":
            path = ShmPath()
        else:  # connect now, between steps, not in the middle of a forward pass
            conn = self.data_conn(data_addr) if data_addr else None
            path = DataPath(data_addr, conn) if conn is not None else FramesPath()
        t = self.transfers[request_id] = OutgoingTransfer(request_id, dest_addr, send_from, total_tokens,
                                                          send_from, path, dest_pid=dest_pid)
        early = self.early_placements.pop(request_id, None)
        if early is not None:
            self._apply_placement(t, early[1])

    # ---- placements: direct writes into the decode worker's cache ----------------------------
    def place(self, msg: m.KVPlacement) -> None:
        """The decode side reserved blocks and says where they are."""
        if self.arena is not None:  # its reader is now known, even if the transfer already ended
            self.arena.set_reader(msg.request_id, msg.pid)
        t = self.transfers.get(msg.request_id)
        if t is not None:
            t.dest_pid = t.dest_pid or msg.pid
            self._apply_placement(t, msg)
        elif msg.request_id in self.ended:  # a placement that lost the race with the prefill
            if self.ended[msg.request_id][1]:
                self.send(msg.reply_to, [m.encode(m.KVStopped(msg.request_id))])
        else:
            self.early_placements[msg.request_id] = (self.clock(), msg)

    def _apply_placement(self, t: OutgoingTransfer, msg: m.KVPlacement) -> None:
        t.state = TxState.PLACED
        same = (msg.dtype == dtype_name(self.dtype) and msg.num_layers == self.num_layers
                and (msg.num_kv_heads, msg.head_dim) == (self.num_kv_heads, self.head_dim))
        blocks_fit = msg.block_size > 0 and all(0 <= b < msg.num_slots // msg.block_size for b in msg.block_ids)
        if not (isinstance(t.path, ShmPath) and same and blocks_fit
                and len(msg.block_ids) * msg.block_size >= t.total_tokens):
            return  # stays staged; the decode side converts what it receives
        cache = self._map(msg)
        if cache is not None:
            t.path.dest = (cache, list(msg.block_ids), msg.block_size)

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
            if isinstance(t.path, ShmPath):
                t.path.forget_cache(cache)
        cache.view = None
        cache.segment.close()

    # ---- steps ---------------------------------------------------------------------------------
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
                continue  # recomputed after a preemption: already shipped
            s = StepSend(t, t.sent_upto, end, block_tables[chunk.request_id])
            t.path.prepare(self, s)
            self._step.append(s)
            t.sent_upto = end

    def on_layer(self, layer: int) -> None:
        if self.poll_inbox is not None and any(
                not s.direct and t.state is TxState.SENDING and isinstance(t.path, ShmPath)
                for s in self._step for t in (s.transfer,)):
            self.poll_inbox()
            for s in self._step:
                path = s.transfer.path
                if not s.direct and isinstance(path, ShmPath) and path.dest is not None:
                    path.go_direct(self, s, layer)
        k_cache, v_cache = self.kv_caches[layer]
        for s in self._step:
            t = s.transfer
            n = s.end - s.start
            hdr = m.KVChunk(t.request_id, layer, s.start, n, self.num_kv_heads, self.head_dim,
                            dtype_name(self.dtype), self.reply_to)
            t0 = time.perf_counter()
            if t.path.send(self, s, layer, k_cache, v_cache, hdr):
                t.bytes_sent += n * self.token_bytes
                self.bytes_sent += n * self.token_bytes
            t.send_seconds += time.perf_counter() - t0

    def end_step(self) -> None:
        self._step = []
        self.flush_data()

    # ---- the raw TCP data channel ------------------------------------------------------------
    def data_conn(self, data_addr: str) -> tcp.DataSender | None:
        """The connection to a data port, reconnecting a broken one; None if it cannot connect."""
        conn = self.data.get(data_addr)
        if conn is not None and conn.broken:
            conn.close()
            del self.data[data_addr]
            conn = None
        if conn is None:
            try:
                conn = self.data[data_addr] = tcp.DataSender(data_addr, self.secret)
            except OSError as exc:
                log.warning("no KV data connection to %s (%s)", data_addr, exc)
                return None
        return conn

    def flush_data(self) -> None:
        for conn in self.data.values():
            if conn.wants_write:
                conn.flush()

    def data_waiting(self) -> list[int]:
        """File descriptors with queued bytes: poll them for writability."""
        return [c.fileno() for c in self.data.values() if c.wants_write]

    # ---- endings -------------------------------------------------------------------------------
    def finish(self, request_id: str, first_token: int | None) -> None:
        """The prefill ended. Tell the decode side (unless the request ended here) and forget the
        transfer; its shared memory now waits for the decode side's release (or its unlink)."""
        t = self.transfers.pop(request_id, None)
        if t is None:
            return
        if first_token is not None and t.sent_upto >= t.total_tokens and t.path.intact(self, t):
            self.send(t.dest_addr, [m.encode(m.PrefillDone(request_id, first_token, self.num_layers, t.total_tokens,
                                                           t.send_seconds))])
            self.ended[request_id] = (self.clock(), False)
            t.path.end(self, t, finished=True)
        else:
            self._drop(t)

    def abort(self, request_id: str) -> None:
        t = self.transfers.pop(request_id, None)
        if t is not None:
            self._drop(t)
        early = self.early_placements.pop(request_id, None)
        if early is not None:
            self.send(early[1].reply_to, [m.encode(m.KVStopped(request_id))])
        if request_id not in self.ended:  # a placement still on its way gets KVStopped at once
            self.ended[request_id] = (self.clock(), True)
        # A region already handed over stays until the decode side releases it or its process is
        # gone: freeing it now could hand the bytes to another transfer while the decode side reads.

    def _drop(self, t: OutgoingTransfer) -> None:
        # Tell the decode side no write will follow, so it can free blocks it holds for us.
        self.send(t.dest_addr, [m.encode(m.KVStopped(t.request_id))])
        self.ended[t.request_id] = (self.clock(), True)
        t.path.end(self, t, finished=False)

    def release(self, request_id: str) -> None:
        if self.arena is not None:
            self.arena.release(request_id)

    def poll(self) -> None:
        now = self.clock()
        if (self.remote_caches or self.arena is not None and self.arena.allocs) and now - self._checked_readers > 1.0:
            self._checked_readers = now
            self._forget_dead_readers()
        for rid, (born, msg) in list(self.early_placements.items()):
            if now - born > self.timeouts.early_ttl_s:  # its PrefillRequest never came: free the decode side's blocks
                del self.early_placements[rid]
                self.send(msg.reply_to, [m.encode(m.KVStopped(rid))])
        for rid, (when, _) in list(self.ended.items()):
            if now - when > self.timeouts.tombstone_s:
                del self.ended[rid]

    def _forget_dead_readers(self) -> None:
        """Unmap the caches, and free the arena regions, of decode workers whose process is gone.
        A region is never freed by age: its reader may still be waiting for blocks to copy into."""
        for name, cache in list(self.remote_caches.items()):
            if cache.pid and not process_alive(cache.pid):
                self._unmap(name)
        if self.arena is not None:
            for rid in self.arena.reclaim(lambda pid: not process_alive(pid)):
                log.warning("reclaimed the arena region of %s: its decode worker is gone", rid)

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
