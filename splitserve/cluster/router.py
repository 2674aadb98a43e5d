"""Cluster routing policies: pure Python, shared by the gateway and the simulator.

The router keeps a view of every worker (role, health, load, which prefix blocks it caches) and
answers one question per request: which decode worker keeps the KV and generates, and which
prefill worker (if any) computes the prompt. Costs are in KV blocks, so prefix reuse, queued
prefill work and decode load compare on one scale:

  prefill cost(w) = queued prefill tokens / block size + prompt blocks w must compute
  decode cost(w)  = prompt blocks w must receive + DECODE_LOAD_WEIGHT * (running + waiting requests)

Conditional disaggregation: when the part of the prompt the chosen decode worker does not cache
is at most `local_prefill_threshold` tokens, shipping it to a prefill worker costs more than
computing it in place, so the decode worker prefills it itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.engine.block_hash import block_hashes_for


class NoWorkerAvailable(RuntimeError):
    """No healthy worker can take the request (the gateway answers 503)."""


DECODE_LOAD_WEIGHT = 1.0  # blocks of transfer one running or waiting request is worth
KV_HEADROOM_BLOCKS = 1  # free blocks a decode worker keeps beyond the prompt


@dataclass(frozen=True)
class RouterConfig:
    local_prefill_threshold: int = 0  # tokens; 0 disables local prefill unless no prefill worker is up

    def __post_init__(self) -> None:
        if self.local_prefill_threshold < 0:
            raise ValueError("local_prefill_threshold must be non-negative")


@dataclass
class WorkerView:
    worker_id: str
    role: str  # "prefill" | "decode" | "both"
    block_size: int
    kv_blocks_total: int
    healthy: bool = True
    kv_blocks_free: int = 0
    num_running: int = 0
    num_waiting: int = 0
    queued_prefill_tokens: int = 0
    max_running: int = 0  # its max_num_seqs (0: unknown, no seat limit): decode backpressure
    cached: set[bytes] = field(default_factory=set)

    @property
    def can_decode(self) -> bool:
        return self.role in ("decode", "both")

    def overlap_blocks(self, block_hashes: list[bytes]) -> int:
        n = 0
        for h in block_hashes:
            if h not in self.cached:
                break
            n += 1
        return n


@dataclass(frozen=True)
class Placement:
    decode_worker: str
    prefill_worker: str | None  # None: the decode worker prefills locally
    decode_cached_tokens: int  # prompt tokens the decode worker already holds
    prefill_cached_tokens: int  # prompt tokens the prefill worker already holds


class Router:
    def __init__(self, config: RouterConfig = RouterConfig()) -> None:
        self.config = config
        self.workers: dict[str, WorkerView] = {}

    # ---- membership and load ---------------------------------------------------------------
    def add_worker(self, view: WorkerView) -> None:
        if view.kv_blocks_free == 0:
            view.kv_blocks_free = view.kv_blocks_total
        self.workers[view.worker_id] = view

    def remove_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def set_health(self, worker_id: str, healthy: bool) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.healthy = healthy
            if not healthy:
                w.cached.clear()  # a restarted worker starts cold

    def update_load(self, worker_id: str, *, kv_blocks_free: int, num_running: int, num_waiting: int,
                    queued_prefill_tokens: int) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.kv_blocks_free, w.num_running = kv_blocks_free, num_running
            w.num_waiting, w.queued_prefill_tokens = num_waiting, queued_prefill_tokens

    def apply_kv_events(self, worker_id: str, events: list[tuple[str, bytes]]) -> None:
        """("stored" | "removed", block hash) events, as the worker's block manager emits them."""
        w = self.workers.get(worker_id)
        if w is None:
            return
        for kind, h in events:
            if kind == "stored":
                w.cached.add(h)
            else:
                w.cached.discard(h)

    # ---- placement ---------------------------------------------------------------------------
    def place(self, prompt_token_ids: list[int]) -> Placement:
        """Choose workers for a prompt. Prefix overlap is measured with each worker's block size."""
        num_prompt_tokens = len(prompt_token_ids)
        hashes: dict[int, list[bytes]] = {}

        def overlap_tokens(w: WorkerView) -> int:
            if not w.cached:
                return 0
            if w.block_size not in hashes:
                hashes[w.block_size] = block_hashes_for(prompt_token_ids, w.block_size)
            return w.overlap_blocks(hashes[w.block_size]) * w.block_size

        decoders = [w for w in self.workers.values() if w.healthy and w.can_decode]
        if not decoders:
            raise NoWorkerAvailable("no healthy decode worker")
        best = None
        for w in decoders:
            bs = w.block_size
            prompt_blocks = -(-num_prompt_tokens // bs)
            cached = overlap_tokens(w)
            need = prompt_blocks - cached // bs
            fits = w.kv_blocks_free >= need + KV_HEADROOM_BLOCKS
            cost = need + DECODE_LOAD_WEIGHT * (w.num_running + w.num_waiting)
            key = (not fits, cost, -w.kv_blocks_free, w.worker_id)
            if best is None or key < best[0]:
                best = (key, w, cached)
        _, decode, decode_cached = best
        decode_cached = min(decode_cached, max(num_prompt_tokens - 1, 0))
        uncached = num_prompt_tokens - decode_cached

        prefillers = [w for w in self.workers.values() if w.healthy and w.role == "prefill"]
        if not prefillers or uncached <= self.config.local_prefill_threshold:
            return Placement(decode.worker_id, None, decode_cached, decode_cached)
        best_p = None
        for w in prefillers:
            bs = w.block_size
            cached = overlap_tokens(w)
            cost = w.queued_prefill_tokens / bs + (-(-num_prompt_tokens // bs) - cached // bs)
            key = (cost, w.worker_id)
            if best_p is None or key < best_p[0]:
                best_p = (key, w, cached)
        _, prefill, prefill_cached = best_p
        return Placement(decode.worker_id, prefill.worker_id, decode_cached,
                         min(prefill_cached, max(num_prompt_tokens - 1, 0)))

    def on_dispatch(self, placement: Placement, num_prompt_tokens: int) -> None:
        """Optimistic accounting until the next load report, so a burst does not pile onto one worker."""
        d = self.workers.get(placement.decode_worker)
        if d is not None:
            d.num_waiting += 1
            d.kv_blocks_free = max(0, d.kv_blocks_free - (-(-num_prompt_tokens // d.block_size)))
        if placement.prefill_worker is not None:
            p = self.workers.get(placement.prefill_worker)
            if p is not None:
                p.queued_prefill_tokens += num_prompt_tokens - placement.prefill_cached_tokens
