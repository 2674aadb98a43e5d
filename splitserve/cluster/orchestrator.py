"""The gateway's retry and re-placement policy, pure: the gateway and the simulator both run it.

A client request becomes one or more attempts (placements). When an attempt fails, the failure's
reason (`FailureReason`, carried in the worker's message, never matched from its text) decides:

  * the client's fault (INVALID)                      -> 400, no retry
  * the worker's queue is full (QUEUE_FULL)           -> 503 (overloaded), no retry
  * the cached prefix vanished, KV lost or stalled,
    the writer stopped, a worker error                -> place again, without prefix reuse
  * a worker died or could not be reached             -> place again (the prefix may be reused)

A request placed again is `resumed`: it already waited its turn once, so the worker queues it ahead
of new requests instead of at the back (a fault must not cost a request its place in line). At most
`max_attempts` placements per request; then 503.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from splitserve.cluster.messages import FailureReason
from splitserve.cluster.router import Placement

MAX_ATTEMPTS = 4


class AttemptFailed(Exception):
    """An attempt failed for `reason`; `RequestOrchestration.on_failure` decides what follows."""

    def __init__(self, message: str, reason: FailureReason) -> None:
        super().__init__(message)
        self.reason = reason


class Outcome(enum.Enum):
    RETRY = "retry"  # place the request again
    CLIENT_ERROR = "client_error"  # 400: it can never work
    UNAVAILABLE = "unavailable"  # 503: overloaded, or out of attempts


class Phase(enum.Enum):
    PLACING = "placing"
    RUNNING = "running"  # an attempt is out on workers
    DONE = "done"
    FAILED = "failed"


# Reasons after which the prefix the router counted on may be kept (the decode side is intact).
_KEEPS_PREFIX = frozenset({FailureReason.WORKER_DIED})
_FINAL = {FailureReason.INVALID: Outcome.CLIENT_ERROR, FailureReason.QUEUE_FULL: Outcome.UNAVAILABLE}


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reuse_prefix: bool = True


@dataclass(frozen=True)
class AttemptPlan:
    """What one attempt sends: to `decode_worker` (and `prefill_worker`, if any)."""

    sub_id: str
    decode_worker: str
    prefill_worker: str | None
    reuse_tokens: int  # the decode worker takes tokens [0, reuse_tokens) from its prefix cache
    resumed: bool  # placed again after a fault: queued ahead of new requests


class RequestOrchestration:
    """One client request's attempts. `trace` (a list) records (phase, reason) as it moves."""

    def __init__(self, request_id: str, max_attempts: int = MAX_ATTEMPTS, trace: list | None = None) -> None:
        self.request_id = request_id
        self.max_attempts = max_attempts
        self.attempts = 0
        self.reuse_prefix = True
        self.phase = Phase.PLACING
        self.trace = trace

    def _enter(self, phase: Phase, reason: FailureReason | None = None) -> None:
        self.phase = phase
        if self.trace is not None:
            self.trace.append((phase, reason))

    def plan(self, placement: Placement, decode_block_size: int) -> AttemptPlan:
        """The next attempt for this placement."""
        self.attempts += 1
        reuse = placement.decode_cached_tokens // decode_block_size * decode_block_size if self.reuse_prefix else 0
        self._enter(Phase.RUNNING)
        return AttemptPlan(f"{self.request_id}@{self.attempts}", placement.decode_worker, placement.prefill_worker,
                           reuse if placement.prefill_worker is not None else 0, self.attempts > 1)

    def on_failure(self, reason: FailureReason) -> Decision:
        """The current attempt failed: what next."""
        final = _FINAL.get(reason)
        if final is not None:
            self._enter(Phase.FAILED, reason)
            return Decision(final)
        if self.attempts >= self.max_attempts:
            self._enter(Phase.FAILED, reason)
            return Decision(Outcome.UNAVAILABLE)
        self.reuse_prefix = reason in _KEEPS_PREFIX
        self._enter(Phase.PLACING, reason)
        return Decision(Outcome.RETRY, self.reuse_prefix)

    def on_done(self) -> None:
        self._enter(Phase.DONE)
