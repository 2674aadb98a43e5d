"""Decode backpressure, pure: the gateway and the simulator both run it.

In disaggregated mode the prefill worker streams the first token as soon as the prompt is computed.
If no decode worker can take the request then, the client sees its first token and then one long
stall while the KV waits for a decode seat. So a request is dispatched (its prefill starts) only
when some decode worker can take it now:

  * a free running seat: running + waiting (+ reserving) < its max_num_seqs, and
  * free KV blocks for the prompt plus output headroom (min(max_tokens, output_reserve_tokens))
    plus the router's KV_HEADROOM_BLOCKS,

as the router's `WorkerView` load reports say. Otherwise it waits in a bounded FIFO in front of
prefill (TTFT carries the wait); beyond `max_queue` the gateway answers 503. The head of the queue
is released as capacity frees; a request never overtakes an earlier one (no starvation of long
prompts). The caller accounts each released request (Router.on_dispatch) before asking for the
next one, so one load report never admits more than it has room for.

Re-placements after a fault skip the queue: they were admitted once already.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

from splitserve.cluster.router import KV_HEADROOM_BLOCKS, WorkerView


@dataclass(frozen=True)
class AdmissionConfig:
    enabled: bool = True
    max_queue: int = 1024  # requests waiting at the gateway; beyond, 503
    output_reserve_tokens: int = 256  # output tokens whose KV a decode worker must have free up front

    def __post_init__(self) -> None:
        if self.max_queue < 0 or self.output_reserve_tokens < 0:
            raise ValueError("max_queue and output_reserve_tokens must be non-negative")


class Verdict(enum.Enum):
    ADMIT = "admit"  # dispatch now
    QUEUED = "queued"  # wait for `release`
    REJECTED = "rejected"  # the queue is full: 503


@dataclass(frozen=True)
class QueueStats:
    length: int
    oldest_wait_s: float
    admitted: int  # dispatched at once or released from the queue
    queued: int  # ever queued
    rejected: int


@dataclass(frozen=True)
class _Waiting:
    num_tokens: int
    max_tokens: int
    t_enqueued: float


def can_take(w: WorkerView, num_tokens: int, reserve_tokens: int) -> bool:
    """Whether decode worker `w` has a free seat and KV for `num_tokens` + `reserve_tokens` now."""
    if not (w.healthy and w.can_decode):
        return False
    if w.max_running and w.num_running + w.num_waiting >= w.max_running:
        return False
    need = -(-(num_tokens + reserve_tokens) // w.block_size) + KV_HEADROOM_BLOCKS
    return w.kv_blocks_free >= need or w.kv_blocks_free == w.kv_blocks_total  # an idle worker takes anything


class DecodeAdmission:
    """The gateway's queue in front of prefill. `now` is any monotonic clock (virtual in the simulator)."""

    def __init__(self, config: AdmissionConfig = AdmissionConfig()) -> None:
        self.config = config
        self._queue: OrderedDict[str, _Waiting] = OrderedDict()
        self.num_admitted = self.num_queued = self.num_rejected = 0

    def __len__(self) -> int:
        return len(self._queue)

    def _fits(self, views: Iterable[WorkerView], num_tokens: int, max_tokens: int) -> bool:
        reserve = min(max_tokens, self.config.output_reserve_tokens)
        return any(can_take(w, num_tokens, reserve) for w in views)

    def offer(self, key: str, num_tokens: int, max_tokens: int, views: Iterable[WorkerView],
              now: float) -> Verdict:
        """A new request: dispatch it now if nobody waits and a decode worker can take it."""
        if key in self._queue:
            raise ValueError(f"{key!r} is already queued")
        if not self.config.enabled or (not self._queue and self._fits(views, num_tokens, max_tokens)):
            self.num_admitted += 1
            return Verdict.ADMIT
        if len(self._queue) >= self.config.max_queue:
            self.num_rejected += 1
            return Verdict.REJECTED
        self._queue[key] = _Waiting(num_tokens, max_tokens, now)
        self.num_queued += 1
        return Verdict.QUEUED

    def pop_ready(self, views: Iterable[WorkerView]) -> str | None:
        """The head of the queue if a decode worker can take it now (account for it, then call again)."""
        if not self._queue:
            return None
        key, head = next(iter(self._queue.items()))
        if not self._fits(views, head.num_tokens, head.max_tokens):
            return None
        del self._queue[key]
        self.num_admitted += 1
        return key

    def cancel(self, key: str) -> bool:
        """A queued request left (its client went away): drop it. False if it was not queued."""
        return self._queue.pop(key, None) is not None

    def stats(self, now: float) -> QueueStats:
        oldest = now - next(iter(self._queue.values())).t_enqueued if self._queue else 0.0
        return QueueStats(len(self._queue), oldest, self.num_admitted, self.num_queued, self.num_rejected)
