"""Paged KV cache bookkeeping: which blocks each request owns, reference counts, prefix cache.

Pure Python: no torch, no I/O, no clock. The simulator drives the same object.

A block is in exactly one of three places:
  * owned: ref_count > 0, listed in one or more requests' block tables;
  * free and uncached: handed out first;
  * free and cached: holds a full block of known content (its hash is in `cached`), reusable by
    a later request with the same prefix, evicted least-recently-freed first when space runs out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from splitserve.engine.block_hash import block_hashes_for
from splitserve.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[Any] = [None] * num_blocks  # bytes, or None
        self.cached: dict[bytes, int] = {}
        self.free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() from the end
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        self.req_blocks: dict[str, list[int]] = {}
        self.req_num_hashed: dict[str, int] = {}
        # Prefix-cache hit accounting (tokens), for metrics.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        # Optional sink for ("stored" | "removed", hash) events; the router listens to these.
        self.events: list[Any] | None = None

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_of(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def is_idle(self) -> bool:
        """True when no request holds a block: the leak check after every scenario."""
        return not self.req_blocks and self.num_free_blocks == self.num_blocks

    def get_computed_blocks(self, request: Request, count: bool = True) -> tuple[list[int], int]:
        """Longest run of cached full blocks that prefixes the request. Takes no references.

        At least one token is always left to compute: the step needs its logits. `count`: add
        the lookup to the prefix-cache query and hit counters.
        """
        if not self.enable_prefix_caching:
            return [], 0
        hashes = block_hashes_for(request.token_ids, self.block_size, request.block_hashes)
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[int] = []
        for h in hashes[:max_blocks]:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        if count:
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += len(blocks) * self.block_size
        return blocks, len(blocks) * self.block_size

    # ---- mutations -----------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_total_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Make the request's block table cover `num_total_tokens` tokens.

        `computed_blocks` (from get_computed_blocks, only on first admission) are shared, not
        copied. Returns False and changes nothing when there is not enough free space.
        """
        if not computed_blocks:  # growing a table (or a first one without a prefix hit)
            rid = request.request_id
            blocks = self.req_blocks.get(rid)
            num_new = -(-num_total_tokens // self.block_size) - (len(blocks) if blocks is not None else 0)
            if num_new > 0 and num_new > len(self.free_uncached) + len(self.free_cached):
                return False
            if blocks is None:
                blocks = self.req_blocks[rid] = []
            if num_new == 1:  # decode crossing into a new block: the common allocation
                blocks.append(self._take_free_block())
            elif num_new > 1:
                # Ascending ids keep a request's blocks in long runs of adjacent slots, so KV lands
                # with slice copies instead of scatters (eviction hands cached blocks out tail-first).
                blocks.extend(sorted(self._take_free_blocks(num_new)))
            return True
        fits = self._num_new_blocks(request, num_total_tokens, computed_blocks)
        if fits is None:
            return False
        num_new = fits
        blocks = self.req_blocks.setdefault(request.request_id, [])
        assert not blocks, "computed blocks are only taken on first admission"
        ref_counts, free_cached = self.ref_counts, self.free_cached
        for block in computed_blocks:
            if ref_counts[block] == 0:
                del free_cached[block]
            ref_counts[block] += 1
            blocks.append(block)
        self.req_num_hashed[request.request_id] = len(computed_blocks)
        if num_new:
            blocks.extend(sorted(self._take_free_blocks(num_new)))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's blocks that are full of computed tokens to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        start = self.req_num_hashed.get(rid, 0)
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= start:
            return  # no block filled up since the last call: most steps
        blocks = self.req_blocks.get(rid)
        if not blocks:
            return
        if num_full > len(blocks):
            num_full = len(blocks)
            if num_full <= start:
                return
        hashes = request.block_hashes
        if len(hashes) < num_full:
            hashes = block_hashes_for(request.token_ids, self.block_size, hashes)
        block_hash, cached, events = self.block_hash, self.cached, self.events
        for block, h in zip(blocks[start:num_full], hashes[start:num_full]):
            if block_hash[block] is not None:
                continue  # shared from the cache already
            if cached.setdefault(h, block) == block:  # a twin computed concurrently keeps the first copy
                block_hash[block] = h
                if events is not None:
                    events.append(("stored", h))
        self.req_num_hashed[rid] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks first, so they are evicted first."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self.req_num_hashed.pop(request.request_id, None)
        if not blocks:
            return
        ref_counts, block_hash = self.ref_counts, self.block_hash
        free_cached, free_uncached = self.free_cached, self.free_uncached
        for block in reversed(blocks):
            refs = ref_counts[block] - 1
            ref_counts[block] = refs
            if not refs:
                if block_hash[block] is not None:
                    free_cached[block] = None
                else:
                    free_uncached.append(block)

    # ---- internals -----------------------------------------------------------------------
    def _num_new_blocks(self, request: Request, num_total_tokens: int, computed_blocks) -> int | None:
        have = len(self.req_blocks.get(request.request_id, ())) + len(computed_blocks)
        num_new = max(0, cdiv(num_total_tokens, self.block_size) - have)
        # Cached blocks we are about to share stop being free.
        reviving = sum(1 for b in computed_blocks if self.ref_counts[b] == 0) if computed_blocks else 0
        if num_new > self.num_free_blocks - reviving:
            return None
        return num_new

    def _take_free_block(self) -> int:
        """One free block, as _take_free_blocks(1) takes it."""
        if self.free_uncached:
            block = self.free_uncached.pop()
        else:  # evict (as in _take_free_blocks)
            block = self.free_cached.popitem(False)[0]
            h = self.block_hash[block]
            self.block_hash[block] = None
            del self.cached[h]
            if self.events is not None:
                self.events.append(("removed", h))
        self.ref_counts[block] = 1
        return block

    def _take_free_blocks(self, n: int) -> list[int]:
        """n free blocks (the caller checked there are enough), each with one reference: uncached
        ones first, newest freed first, then cached ones least-recently freed first, evicted."""
        free_uncached = self.free_uncached
        k = min(n, len(free_uncached))
        if k:
            taken = free_uncached[-k:]
            taken.reverse()  # the order pop() would hand them out
            del free_uncached[-k:]
        else:
            taken = []
        if k < n:
            # Evict: their content leaves the prefix cache. A cached free block always has a hash,
            # and `cached` maps that hash back to it (check_integrity asserts both).
            popitem = self.free_cached.popitem
            evicted = [popitem(False)[0] for _ in range(n - k)]
            block_hash, cached, events = self.block_hash, self.cached, self.events
            for block in evicted:
                h = block_hash[block]
                block_hash[block] = None
                del cached[h]
                if events is not None:
                    events.append(("removed", h))
            taken += evicted
        ref_counts = self.ref_counts
        for block in taken:
            ref_counts[block] = 1
        return taken

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]
                if self.events is not None:
                    self.events.append(("removed", h))

    def check_integrity(self) -> None:
        """Assert every invariant of the structure; tests call this after each scenario."""
        refs = [0] * self.num_blocks
        for rid, blocks in self.req_blocks.items():
            assert len(set(blocks)) == len(blocks), f"{rid} lists a block twice"
            for b in blocks:
                refs[b] += 1
        assert refs == self.ref_counts, "reference counts disagree with block tables"
        free_u, free_c = set(self.free_uncached), set(self.free_cached)
        assert len(free_u) == len(self.free_uncached), "a block is free twice"
        assert not free_u & free_c, "a block is in both free lists"
        for b in range(self.num_blocks):
            is_free = b in free_u or b in free_c
            assert is_free == (self.ref_counts[b] == 0), f"block {b}: free={is_free} ref={self.ref_counts[b]}"
            if b in free_u:
                assert self.block_hash[b] is None, f"uncached free block {b} has a hash"
            if b in free_c:
                assert self.block_hash[b] is not None, f"cached free block {b} has no hash"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, f"cache map points at block {b} with another hash"
        hashed = sum(1 for h in self.block_hash if h is not None)
        assert hashed == len(self.cached), "a hashed block is missing from the cache map"
