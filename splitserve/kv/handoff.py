"""The KV handoff's decode side as a pure state machine, shared by the live workers and the simulator.

One `Incoming` per transfer moves through explicit states:

    EARLY      KV or PrefillDone arrived before the ReserveKV (kept a short while)
    RESERVING  the request is known; no blocks yet (the decode worker is full): retried every tick
    PLACED     blocks reserved (a same-host writer has been told where to write)
    LANDING    some KV has arrived
    READY      every layer covers every token and PrefillDone is in: admitted (terminal)
    FENCED     dropped while the writer may still write into our blocks: the blocks stay reserved
               until the writer says PrefillDone/KVStopped or its process is gone
    FAILED     failed with a `FailureReason` (terminal; kept a while so late messages are discarded)
    DROPPED    aborted by the gateway (terminal; kept a while as FAILED)

`on(event, now)` and `tick(now)` return `Action`s; the caller carries them out: the engine (or the
simulator) the scheduler's (`apply_scheduler_actions`), the KV connector the data-plane ones. No
torch, no sockets, no clock: `now` comes from the caller, so the same code runs on a virtual clock.

Timeouts measure lack of progress, never waiting: a transfer whose prefill has not started is queued
at the prefill worker (whose liveness the gateway watches), and a transfer whose KV is all here but
that has no blocks yet waits for this worker's own decodes to free some. Only KV that stops arriving
mid-transfer (`stall_s`) or a writer that stopped without finishing fails a transfer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from splitserve.cluster.messages import FailureReason


class RxState(enum.Enum):
    EARLY = "early"
    RESERVING = "reserving"
    PLACED = "placed"
    LANDING = "landing"
    READY = "ready"
    FENCED = "fenced"
    FAILED = "failed"
    DROPPED = "dropped"


class Writer(enum.Enum):
    """What the prefill side may still do to our blocks."""

    UNPLACED = "unplaced"  # no placement offered: it cannot write into our cache
    MAY_WRITE = "may_write"  # placement offered: it may write until it says it ended
    ENDED = "ended"  # PrefillDone or KVStopped came: it will not write again


@dataclass(frozen=True)
class HandoffTimeouts:
    """Every timeout of the handoff, in one place (seconds)."""

    stall_s: float = 60.0  # KV stopped arriving mid-transfer
    # The prefill has not started: it queues at the prefill worker, whose liveness the gateway
    # watches (and aborts the attempt when it dies). None: no limit - waiting is not a failure.
    queued_s: float | None = None
    stopped_grace_s: float = 5.0  # the writer stopped without PrefillDone; the gateway's abort is due
    early_ttl_s: float = 30.0  # KV for a transfer that was never reserved here
    tombstone_s: float = 30.0  # late messages for a finished transfer are discarded this long
    fence_max_s: float = 120.0  # a live writer that never answers: free the blocks anyway, loudly


# ---- events (what the caller tells the machine) --------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reserve:
    """ReserveKV: hold blocks for `request`; its first `reuse_tokens` come from our prefix cache."""

    request_id: str
    request: Any  # the engine's Request (opaque here)
    reuse_tokens: int
    num_layers: int
    writer: bool = False  # a same-host writer that gets a placement once blocks are held


@dataclass(frozen=True, slots=True)
class Reserved:
    """Result of a TRY_RESERVE: blocks held (`ok`), or not, and then whether the prefix is gone."""

    request_id: str
    ok: bool
    prefix_gone: bool = False


@dataclass(frozen=True, slots=True)
class Chunk:
    """KV for layers [layer, layer + num_layers) and tokens [start, start + num_tokens) arrived."""

    request_id: str
    layer: int
    num_layers: int
    start: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Done:
    """PrefillDone: the first token, KV covers [.., token_end); `send_seconds` the writer spent moving it."""

    request_id: str
    first_token: int
    token_end: int
    send_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Stopped:
    """KVStopped: the writer will not write again (it ended without PrefillDone)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class WriterGone:
    """The writer's process no longer exists (same host)."""

    request_id: str


# ---- actions (what the caller must do) -------------------------------------------------------------
class Act(enum.Enum):
    TRY_RESERVE = "try_reserve"  # scheduler.reserve_remote; arg: first try (count prefix-cache stats)
    OFFER_PLACEMENT = "offer_placement"  # tell the same-host writer where our blocks are
    LAND = "land"  # put the data of this chunk (or every buffered one) into the reserved blocks
    BUFFER = "buffer"  # keep this chunk's data until blocks are reserved
    DISCARD = "discard"  # drop this chunk's data (and its sender's memory)
    ADMIT = "admit"  # scheduler.admit_remote; arg: the first token
    FREE_BLOCKS = "free_blocks"  # scheduler.finish; arg: True when a fence expired on a live writer
    RELEASE_SOURCE = "release_source"  # release the sender's memory; drop buffered data
    REPORT_FAILURE = "report_failure"  # tell the gateway; arg: the FailureReason


class Action(NamedTuple):
    kind: Act
    request_id: str
    arg: Any = None


@dataclass(slots=True)
class Incoming:
    request_id: str
    state: RxState
    since: float  # when it entered its state
    request: Any = None
    reuse_tokens: int = 0
    created: float = 0.0
    arrived: list[int] = field(default_factory=list)  # tokens arrived per layer
    last_progress: float | None = None  # the last KV or PrefillDone (None: the prefill has not started)
    first_token: int | None = None
    token_end: int = 0
    writer: Writer = Writer.UNPLACED
    wants_placement: bool = False
    stopped_at: float | None = None  # the writer stopped without PrefillDone
    hole: bool = False  # a chunk started past what had arrived for its layer: some KV was lost
    early_starts: dict[int, int] | None = None  # before Reserve: each layer's first chunk start
    reason: FailureReason | None = None

    @property
    def reserved(self) -> bool:
        return self.state in (RxState.PLACED, RxState.LANDING, RxState.FENCED)

    @property
    def complete(self) -> bool:
        return self.first_token is not None and all(r >= self.token_end for r in self.arrived)


_LIVE = (RxState.RESERVING, RxState.PLACED, RxState.LANDING)
_TERMINAL = (RxState.FAILED, RxState.DROPPED)


class DecodeHandoff:
    """Every incoming transfer of one decode worker. `trace` (when a list) records (id, state)."""

    def __init__(self, timeouts: HandoffTimeouts = HandoffTimeouts(), trace: list | None = None) -> None:
        self.timeouts = timeouts
        self.transfers: dict[str, Incoming] = {}
        self.trace = trace
        self.num_done = 0
        self.num_failed = 0

    # ---- queries ---------------------------------------------------------------------------
    def get(self, request_id: str) -> Incoming | None:
        return self.transfers.get(request_id)

    def state(self, request_id: str) -> RxState | None:
        t = self.transfers.get(request_id)
        return t.state if t is not None else None

    def is_reserved(self, request_id: str) -> bool:
        t = self.transfers.get(request_id)
        return t is not None and t.state in (RxState.PLACED, RxState.LANDING)

    def is_fenced(self, request_id: str) -> bool:
        return self.state(request_id) is RxState.FENCED

    def fenced(self) -> list[str]:
        return [rid for rid, t in self.transfers.items() if t.state is RxState.FENCED]

    @property
    def num_reserving(self) -> int:
        """Transfers waiting for blocks (not in the scheduler's queues yet)."""
        return sum(1 for t in self.transfers.values() if t.state is RxState.RESERVING)

    @property
    def num_active(self) -> int:
        return sum(1 for t in self.transfers.values() if t.state in _LIVE)

    @property
    def busy(self) -> bool:
        """Anything that still needs ticks: live, early or fenced transfers (tombstones do not)."""
        return any(t.state not in _TERMINAL for t in self.transfers.values())

    # ---- events ----------------------------------------------------------------------------
    def on(self, event: Any, now: float) -> list[Action]:
        if isinstance(event, Chunk):
            return self._on_chunk(event, now)
        if isinstance(event, Done):
            return self._on_done(event, now)
        if isinstance(event, Reserve):
            return self._on_reserve(event, now)
        if isinstance(event, Reserved):
            return self._on_reserved(event, now)
        if isinstance(event, (Stopped, WriterGone)):
            return self._on_writer_ended(event.request_id, now)
        if isinstance(event, Abort):
            return self._on_abort(event.request_id, now)
        raise TypeError(f"unknown handoff event {event!r}")

    def _enter(self, t: Incoming, state: RxState, now: float) -> None:
        if t.state is not state:
            t.state, t.since = state, now
            if self.trace is not None:
                self.trace.append((t.request_id, state))

    def _on_reserve(self, e: Reserve, now: float) -> list[Action]:
        t = self.transfers.get(e.request_id)
        if t is not None and t.state is not RxState.EARLY:
            raise ValueError(f"duplicate request id {e.request_id!r}")
        if t is None:
            t = self.transfers[e.request_id] = Incoming(e.request_id, RxState.EARLY, now)
        t.request, t.reuse_tokens, t.created, t.wants_placement = e.request, e.reuse_tokens, now, e.writer
        early = t.arrived + [0] * (e.num_layers - len(t.arrived))
        t.arrived = [max(a, e.reuse_tokens) for a in early]
        if t.early_starts and max(t.early_starts.values()) > e.reuse_tokens:
            t.hole = True  # a layer's first chunk began past the prefix we hold: some KV was lost
        t.early_starts = None
        self._enter(t, RxState.RESERVING, now)
        return [Action(Act.TRY_RESERVE, e.request_id, True)]

    def _on_reserved(self, e: Reserved, now: float) -> list[Action]:
        t = self.transfers.get(e.request_id)
        if t is None or t.state is not RxState.RESERVING:
            return []
        if not e.ok:
            return self._fail(t, FailureReason.PREFIX_EVICTED, now) if e.prefix_gone else []
        acts = [Action(Act.LAND, t.request_id)]  # whatever arrived before the blocks
        self._enter(t, RxState.LANDING if t.last_progress is not None else RxState.PLACED, now)
        if t.wants_placement and t.first_token is None and t.stopped_at is None:
            t.writer = Writer.MAY_WRITE
            acts.append(Action(Act.OFFER_PLACEMENT, t.request_id))
        return acts

    def _on_chunk(self, e: Chunk, now: float) -> list[Action]:
        t = self.transfers.get(e.request_id)
        if t is None:
            t = self.transfers[e.request_id] = Incoming(e.request_id, RxState.EARLY, now)
        if t.state in _TERMINAL or t.state is RxState.FENCED:
            return [Action(Act.DISCARD, e.request_id)]
        if not t.arrived:
            t.arrived = [0] * (e.layer + e.num_layers)
        elif len(t.arrived) < e.layer + e.num_layers:
            t.arrived.extend([0] * (e.layer + e.num_layers - len(t.arrived)))
        early = t.state is RxState.EARLY
        for layer in range(e.layer, e.layer + e.num_layers):
            if early and not t.arrived[layer]:
                # Where a layer starts is judged at Reserve: the writer skips the tokens our prefix
                # cache holds, and how many those are is not known yet.
                t.early_starts = t.early_starts or {}
                t.early_starts.setdefault(layer, e.start)
            elif e.start > t.arrived[layer]:  # chunks of a layer come in token order: one went missing
                t.hole = True
            t.arrived[layer] = max(t.arrived[layer], e.start + e.num_tokens)
        t.last_progress = now
        if t.state is RxState.PLACED:
            self._enter(t, RxState.LANDING, now)
        return [Action(Act.LAND if t.reserved else Act.BUFFER, e.request_id)]

    def _on_done(self, e: Done, now: float) -> list[Action]:
        t = self.transfers.get(e.request_id)
        if t is None:
            t = self.transfers[e.request_id] = Incoming(e.request_id, RxState.EARLY, now)
        if t.state is RxState.FENCED:
            return self._unfence(t, now)  # it was dropped here first; the writer has now finished
        if t.state in _TERMINAL:
            return []
        t.first_token, t.token_end = e.first_token, e.token_end
        t.writer = Writer.ENDED
        t.last_progress = now
        return []

    def _on_writer_ended(self, rid: str, now: float) -> list[Action]:
        """KVStopped, or the writer's process is gone: it will not write again."""
        t = self.transfers.get(rid)
        if t is None:
            return []
        if t.state is RxState.FENCED:
            return self._unfence(t, now)
        if t.state in _LIVE and t.first_token is None and t.stopped_at is None:
            t.writer = Writer.ENDED
            t.stopped_at = now  # the transfer cannot complete; the gateway normally aborts it first
        return []

    def _on_abort(self, rid: str, now: float) -> list[Action]:
        t = self.transfers.get(rid)
        if t is None:
            t = self.transfers[rid] = Incoming(rid, RxState.DROPPED, now)  # a tombstone for late KV
            if self.trace is not None:
                self.trace.append((rid, RxState.DROPPED))
            return []
        if t.state in _TERMINAL or t.state is RxState.FENCED:
            return []
        return self._end(t, RxState.DROPPED, None, now)

    # ---- time ------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Retry reservations (every waiting transfer, oldest first), admit complete transfers,
        time out stalls, lift expired fences, forget old tombstones."""
        acts: list[Action] = []
        to = self.timeouts
        for t in list(self.transfers.values()):
            s = t.state
            if s in _TERMINAL:
                if now - t.since > to.tombstone_s:
                    del self.transfers[t.request_id]
            elif s is RxState.EARLY:
                if now - t.since > to.early_ttl_s:
                    del self.transfers[t.request_id]
                    acts.append(Action(Act.RELEASE_SOURCE, t.request_id))
            elif s is RxState.FENCED:
                if now - t.since > to.fence_max_s:
                    acts += self._unfence(t, now, forced=True)
            else:
                acts += self._advance(t, now)
        return acts

    def _advance(self, t: Incoming, now: float) -> list[Action]:
        if t.hole:
            return self._fail(t, FailureReason.KV_LOST, now)
        if t.state is RxState.RESERVING:
            acts = [Action(Act.TRY_RESERVE, t.request_id, False)]
        elif t.complete:
            if t.token_end != t.request.num_tokens:  # the writer covered less than the prompt
                return self._fail(t, FailureReason.KV_LOST, now)
            self._enter(t, RxState.READY, now)
            del self.transfers[t.request_id]
            self.num_done += 1
            return [Action(Act.ADMIT, t.request_id, t.first_token), Action(Act.RELEASE_SOURCE, t.request_id)]
        else:
            acts = []
        deadline = self._deadline(t)
        if deadline is not None and now > deadline:
            reason = FailureReason.WRITER_STOPPED if t.stopped_at is not None else FailureReason.TRANSFER_STALLED
            return self._fail(t, reason, now)
        return acts

    def _deadline(self, t: Incoming) -> float | None:
        to = self.timeouts
        if t.stopped_at is not None:
            return t.stopped_at + to.stopped_grace_s
        if t.complete:
            return None  # all here, waiting for our own blocks: queueing, not a stall
        if t.last_progress is None:  # queued at the prefill worker
            return None if to.queued_s is None else t.created + to.queued_s
        return t.last_progress + to.stall_s

    # ---- endings ---------------------------------------------------------------------------
    def _fail(self, t: Incoming, reason: FailureReason, now: float) -> list[Action]:
        self.num_failed += 1
        acts = self._end(t, RxState.FAILED, reason, now)
        acts.append(Action(Act.REPORT_FAILURE, t.request_id, reason))
        return acts

    def _end(self, t: Incoming, state: RxState, reason: FailureReason | None, now: float) -> list[Action]:
        """Fail or drop: release the sender's memory; free the blocks unless the writer may still
        write into them (then FENCED until it cannot)."""
        acts = [Action(Act.RELEASE_SOURCE, t.request_id)]
        t.reason = reason
        if t.reserved and t.writer is Writer.MAY_WRITE:
            self._enter(t, RxState.FENCED, now)
            t.reason = reason
            return acts
        if t.reserved:
            acts.append(Action(Act.FREE_BLOCKS, t.request_id, False))
        self._enter(t, state, now)
        return acts

    def _unfence(self, t: Incoming, now: float, forced: bool = False) -> list[Action]:
        t.writer = Writer.ENDED
        self._enter(t, RxState.DROPPED if t.reason is None else RxState.FAILED, now)
        return [Action(Act.FREE_BLOCKS, t.request_id, forced)]

    def close(self, now: float) -> list[Action]:
        """Shutting down: end everything; fenced blocks are freed too (nobody will reuse them)."""
        acts: list[Action] = []
        for t in list(self.transfers.values()):
            if t.state in _LIVE or t.state is RxState.EARLY:
                t.writer = Writer.ENDED
                acts += self._end(t, RxState.DROPPED, None, now)
            elif t.state is RxState.FENCED:
                acts += self._unfence(t, now)
        self.transfers.clear()
        return acts


def apply_scheduler_actions(scheduler: Any, handoff: DecodeHandoff, actions: list[Action], now: float) -> list[Action]:
    """Carry out the scheduler's part of `actions` (reserve, admit, free) on `scheduler`, feeding
    reservation results back into `handoff`; return the rest (data plane, reports) in order.
    The engine and the simulator both call this: nothing else touches reserve_remote/admit_remote."""
    rest: list[Action] = []
    queue = list(actions)
    i = 0
    while i < len(queue):
        a = queue[i]
        i += 1
        if a.kind is Act.TRY_RESERVE:
            t = handoff.get(a.request_id)
            if t is None or t.state is not RxState.RESERVING:
                continue
            result = scheduler.reserve_remote(t.request, t.reuse_tokens, count_query=bool(a.arg))
            queue[i:i] = handoff.on(Reserved(a.request_id, result is True, result is None), now)
        elif a.kind is Act.ADMIT:
            scheduler.admit_remote(a.request_id, a.arg)
            rest.append(a)  # the data plane counts the finished transfer
        elif a.kind is Act.FREE_BLOCKS:
            scheduler.finish(a.request_id)
            rest.append(a)  # the caller may warn about a forced one
        else:
            rest.append(a)
    return rest
