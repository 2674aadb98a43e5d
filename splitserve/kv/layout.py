"""Where a request's tokens live in a paged KV cache, and the wire format's dtype names.

A cache is [slots, heads, head_dim] per layer and K/V; token i of a request sits in slot
`block_ids[i // block_size] * block_size + i % block_size`. Copies run fastest as a few slices
over runs of adjacent slots, so these helpers turn token ranges into such runs.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

MAX_RUNS = 16  # beyond this many runs a chunk is "fragmented": one gather/scatter instead


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def wire_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported KV dtype {name!r}")
    return getattr(torch, name)


def token_slots(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(block_ids, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


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


def process_alive(pid: int) -> bool:
    """Same host only: is this process still running (a writer into our cache, or its owner)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class KVSide:
    """What both halves of the connector know: the local cache's geometry and how to reach peers."""

    def __init__(self, kv_caches, block_size: int, send, reply_to: str = "", secret: bytes = b"",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.send = send  # (peer inbox address, frames)
        self.reply_to = reply_to  # this worker's inbox
        self.secret = secret  # the raw TCP data channel's
        self.clock = clock
        k0 = kv_caches[0][0]
        self.num_layers = len(kv_caches)
        self.num_kv_heads, self.head_dim = k0.shape[1], k0.shape[2]
        self.dtype = k0.dtype
        self.device = k0.device
        self.row_bytes = self.num_kv_heads * self.head_dim * k0.element_size()  # one token, K or V
        self.token_bytes = 2 * self.row_bytes
