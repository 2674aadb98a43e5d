"""How one transfer's KV leaves the prefill worker: one path per transfer, chosen when it starts.

  * `ShmPath` (same host): straight into the decode worker's shared-memory cache at its reserved
    blocks once its KVPlacement is in (one copy, a notice per step); before that, or when the
    caches differ, through the pre-faulted arena (or a one-off segment) plus a notice per layer,
    which the decode side copies into its blocks (two copies). A placement may arrive between
    layers: the rest of the step goes direct.
  * `DataPath` (across hosts): `sendmsg` from the cache slots into the decode worker's raw TCP
    data port (`kv/tcp.py`), which receives into the reserved slots.
  * `FramesPath`: K and V as ZeroMQ frames (a peer with no data port).

Each path answers `send(sender, step, layer, k_cache, v_cache, hdr)` and `end(...)`; the sender
(`kv/sender.py`) keeps the per-step bookkeeping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from splitserve.cluster import messages as m
from splitserve.kernels.fused import copy_rows
from splitserve.kv import shm, tcp
from splitserve.kv.layout import paired_runs, slot_runs, token_slots

log = logging.getLogger("splitserve.kv")


@dataclass
class RemoteCache:
    """A decode worker's KV cache, mapped here: [layers, 2, slots, heads, head_dim]."""

    segment: shm.Segment
    view: torch.Tensor | None
    pid: int = 0  # the decode worker that owns it (same host)


@dataclass
class StepSend:
    """What one step ships for one transfer: tokens [start, end), from our blocks `table`."""

    transfer: Any  # OutgoingTransfer
    start: int
    end: int
    table: list[int]
    slots: torch.Tensor | None = None  # source slots (staged copies, or a fragmented direct copy)
    runs: list[tuple[int, int, int]] | None = None  # direct: (source slot, destination slot, length)
    runs_t: torch.Tensor | None = None  # the same runs as an int64 [n, 3] tensor (one kernel call per layer)
    dst_slots: torch.Tensor | None = None  # direct, fragmented: scatter here
    src_runs: list[tuple[int, int, int]] | None = None  # data channel: runs of our own slots
    direct_from: int = -1  # first layer written directly (-1: not direct; a placement can arrive mid-step)

    @property
    def direct(self) -> bool:
        return self.direct_from >= 0


class KVPath(Protocol):
    """One transfer's way out, chosen when the transfer starts (KVSender.add)."""

    def prepare(self, sender, s: StepSend) -> None:
        """Work out this step's source (and destination) slots."""

    def send(self, sender, s: StepSend, layer: int, k_cache, v_cache, hdr: m.KVChunk) -> bool:
        """Ship layer `layer` of the step's tokens; False when nothing could be sent."""

    def intact(self, sender, t) -> bool:
        """Every chunk reached the decode side's channel (PrefillDone may be claimed)."""

    def end(self, sender, t, finished: bool) -> None:
        """The transfer ended here (with PrefillDone when `finished`): free what is ours to free."""


def _source_slots(sender, s: StepSend) -> torch.Tensor:
    if s.slots is None:
        s.slots = token_slots(s.table, sender.block_size, s.start, s.end).to(sender.kv_caches[0][0].device)
    return s.slots


class ShmPath:
    """Same host: direct into the decode cache after a placement, else staged in shared memory."""

    name = "shm"

    def __init__(self) -> None:
        self.dest: tuple[RemoteCache, list[int], int] | None = None  # (its cache, reserved blocks, block size)
        self.view: torch.Tensor | None = None  # staged: [layers, 2, tokens, heads, head_dim]
        self.shm_name: str | None = None
        self.arena = False  # the staging area is the arena (released by the decode side) or a one-off segment
        self.base_offset = 0
        self.segment: shm.Segment | None = None
        self.announced = False  # a staged chunk was announced: the decode side releases (or unlinks) it

    def prepare(self, sender, s: StepSend) -> None:
        if self.dest is not None:
            self.go_direct(sender, s, 0)
        else:
            _source_slots(sender, s)

    def go_direct(self, sender, s: StepSend, layer: int) -> None:
        """Write this step's tokens straight into the decode cache from `layer` on."""
        _, dst_blocks, dst_bs = self.dest
        s.direct_from = layer
        s.runs = paired_runs(s.table, sender.block_size, dst_blocks, dst_bs, s.start, s.end)
        if s.runs is not None:
            s.runs_t = torch.tensor(s.runs, dtype=torch.long).view(-1, 3)
        else:
            _source_slots(sender, s)
            s.dst_slots = token_slots(dst_blocks, dst_bs, s.start, s.end)

    def send(self, sender, s: StepSend, layer: int, k_cache, v_cache, hdr: m.KVChunk) -> bool:
        t = s.transfer
        n = s.end - s.start
        if s.direct:
            if self.dest is None:  # its decode worker restarted meanwhile: nobody to write for
                return False
            dest = self.dest[0].view
            dk, dv = dest[layer, 0], dest[layer, 1]
            if s.runs is not None:
                copy_rows(dk, k_cache, s.runs, s.runs_t)
                copy_rows(dv, v_cache, s.runs, s.runs_t)
            else:
                dk.index_copy_(0, s.dst_slots, k_cache.index_select(0, s.slots).cpu())
                dv.index_copy_(0, s.dst_slots, v_cache.index_select(0, s.slots).cpu())
            if layer == sender.num_layers - 1:  # the decode side only needs to know when all landed
                hdr.layer, hdr.num_layers_covered, hdr.direct = s.direct_from, layer + 1 - s.direct_from, True
                sender.send(t.dest_addr, [m.encode(hdr)])
            sender.bytes_direct += n * sender.token_bytes
            return True
        if self.view is None:  # opened on first use: a placement may make it unnecessary
            self._open(sender, t)
        rows = slice(s.start - t.send_from, s.end - t.send_from)
        if k_cache.device.type == "cpu":  # one gather per tensor, straight into shared memory
            torch.index_select(k_cache, 0, s.slots, out=self.view[layer, 0, rows])
            torch.index_select(v_cache, 0, s.slots, out=self.view[layer, 1, rows])
        else:  # gather on the device, then one copy to host shared memory
            self.view[layer, 0, rows].copy_(k_cache.index_select(0, s.slots))
            self.view[layer, 1, rows].copy_(v_cache.index_select(0, s.slots))
        total = t.total_tokens - t.send_from
        hdr.shm_name, hdr.arena = self.shm_name, self.arena
        hdr.k_offset = self.base_offset + ((layer * 2) * total + rows.start) * sender.row_bytes
        hdr.v_offset = self.base_offset + ((layer * 2 + 1) * total + rows.start) * sender.row_bytes
        sender.send(t.dest_addr, [m.encode(hdr)])
        self.announced = True
        return True

    def _open(self, sender, t) -> None:
        n = t.total_tokens - t.send_from
        nbytes = sender.num_layers * n * sender.token_bytes
        sender.ensure_arena()
        off = sender.arena.alloc(t.request_id, nbytes, t.dest_pid) if sender.arena else None
        if off is not None:
            buf, self.shm_name, self.arena, self.base_offset = sender.arena.segment.buf, sender.arena.name, True, off
        else:  # arena full (or disabled): a one-off segment, unlinked by the receiver
            self.segment = shm.Segment(shm.segment_name(sender.owner, t.request_id), size=nbytes)
            buf, self.shm_name, self.arena, self.base_offset = self.segment.buf, self.segment.name, False, 0
        flat = torch.frombuffer(buf, dtype=sender.dtype, count=nbytes // sender.dtype.itemsize, offset=self.base_offset)
        self.view = flat.view(sender.num_layers, 2, n, sender.num_kv_heads, sender.head_dim)

    def intact(self, sender, t) -> bool:
        return True

    def end(self, sender, t, finished: bool) -> None:
        """The transfer ended here: PrefillDone sent (`finished`) or not. Shared memory that a
        notice pointed at waits for the decode side; anything else is freed now."""
        self.view = self.dest = None
        if self.segment is not None:
            self.segment.close()
            if not finished or not self.announced:
                self.segment.unlink()
        elif self.arena and not self.announced:
            sender.release(t.request_id)

    def forget_cache(self, cache: RemoteCache) -> None:
        if self.dest is not None and self.dest[0] is cache:
            self.dest = None


class DataPath:
    """Across hosts: the decode worker's raw TCP data port, from our cache slots into its slots."""

    name = "tcp-data"

    def __init__(self, data_addr: str, conn: tcp.DataSender) -> None:
        self.data_addr = data_addr
        self.conn = conn  # the data connection its chunks go over
        self.lost = False  # that connection broke: chunks may be lost, never claim PrefillDone

    def prepare(self, sender, s: StepSend) -> None:
        if sender.kv_caches[0][0].device.type == "cpu":
            s.src_runs = slot_runs(s.table, sender.block_size, s.start, s.end)
        if s.src_runs is None:
            _source_slots(sender, s)

    def send(self, sender, s: StepSend, layer: int, k_cache, v_cache, hdr: m.KVChunk) -> bool:
        if self.lost or sender.data_conn(self.data_addr) is not self.conn:
            self.lost = True  # its earlier chunks went over a connection that broke
            return False
        if s.src_runs is not None:  # straight from our cache slots into the socket
            kp = [k_cache[a : a + length].view(torch.uint8).numpy() for a, _, length in s.src_runs]
            vp = [v_cache[a : a + length].view(torch.uint8).numpy() for a, _, length in s.src_runs]
        else:
            kp = [k_cache.index_select(0, s.slots).cpu().view(torch.uint8).numpy()]
            vp = [v_cache.index_select(0, s.slots).cpu().view(torch.uint8).numpy()]
        self.conn.send(tcp.frame_buffers(hdr, kp, vp))
        if self.conn.broken:
            self.lost = True
        return True

    def intact(self, sender, t) -> bool:
        if self.conn.broken or sender.data.get(self.data_addr) is not self.conn:
            self.lost = True
        return not self.lost

    def end(self, sender, t, finished: bool) -> None:
        pass


class FramesPath:
    """K and V as ZeroMQ frames after the notice (no data port, or it could not be reached)."""

    name = "tcp"

    def prepare(self, sender, s: StepSend) -> None:
        _source_slots(sender, s)

    def send(self, sender, s: StepSend, layer: int, k_cache, v_cache, hdr: m.KVChunk) -> bool:
        k = k_cache.index_select(0, s.slots).cpu()
        v = v_cache.index_select(0, s.slots).cpu()
        sender.send(s.transfer.dest_addr, [m.encode(hdr), k.view(torch.uint8).numpy(), v.view(torch.uint8).numpy()])
        return True

    def intact(self, sender, t) -> bool:
        return True

    def end(self, sender, t, finished: bool) -> None:
        pass
