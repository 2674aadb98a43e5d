"""What the autoscaler measures: the live load and the workers' own step times over a sliding window.

The gateway reports each request (`start` when it arrives, `RequestTimer.on_token` per streamed
token, `finish` when it ends) and, once per autoscaler interval, every worker's cumulative step
counters (`observe_workers`, from `messages.Stats`). `measure()` turns the window into a
`LoadMeasurement`: arrival rate, prompt and output lengths, prefix hit rate, observed TTFT/TPOT
and per-role step times. No sockets, no threads: the clock is passed in, so tests run it on a fake
one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MAX_SAMPLES = 4096  # requests kept per window (bounded memory at any rate)
SLO_PERCENTILE = 90  # the SLOs hold when this percentile of TTFT and of TPOT is within them
MIN_FINISHED_FOR_LENGTHS = 5  # fewer finished requests than this: the lengths of those in flight count too


@dataclass(frozen=True)
class RequestSample:
    """One finished request as the gateway saw it."""

    t_end: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_s: float | None  # None: no token was streamed (failed or aborted before its first token)
    tpot_s: float | None  # None: fewer than two tokens


@dataclass(frozen=True)
class StepTimes:
    """One role's engine steps over the window, from the workers' own counters (busy time only)."""

    steps: int
    decode_steps: int
    decode_step_s: float  # mean wall time of a decode-only step
    decode_batch: float  # mean sequences in a decode-only step
    prefill_steps: int
    prefill_step_s: float  # mean wall time of a step with a prefill chunk
    prefill_tokens_per_step: float  # mean tokens computed in such a step
    busy_fraction: float  # busy seconds / (window x workers of the role)
    overhead_s: float = 0.0  # mean worker-loop time around a step taken back to back with the previous one


@dataclass(frozen=True)
class LoadMeasurement:
    window_s: float  # the span the figures cover (shorter than the window right after start)
    # Requests per second that arrived at the gateway: over the window, or over its last third when
    # that is higher (a rate step shows within a third of the window; a drop takes the whole window)
    arrival_rate: float
    num_arrivals: int
    prompt_lens: tuple[int, ...]  # of the finished requests, in order of finishing (with too few: in flight too)
    output_lens: tuple[int, ...]  # (a request in flight counts its max_tokens)
    prefix_hit_rate: float  # cached prompt tokens / prompt tokens
    # The SLO percentile over finished requests and, for TTFT, the wait so far of those still
    # waiting for their first token (a lower bound: an overload where nothing finishes still shows)
    ttft_ms: float | None
    tpot_ms: float | None
    steps: dict[str, StepTimes] = field(default_factory=dict)  # role -> its step times
    num_finished: int = 0
    num_waiting_first: int = 0  # in flight without a first token yet


def percentile(values: Iterable[float], pct: float) -> float | None:
    """Nearest-rank percentile (no interpolation: a value that was observed)."""
    xs = sorted(values)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(-(-pct * len(xs) // 100)) - 1))
    return xs[k]


class RequestTimer:
    """One request in flight: its arrival, first and last token times, tokens and cached prompt tokens."""

    __slots__ = ("t_arrival", "prompt_tokens", "max_tokens", "cached_tokens", "t_first", "t_last", "num_tokens",
                 "_clock")

    def __init__(self, t_arrival: float, prompt_tokens: int, max_tokens: int, clock: Callable[[], float]) -> None:
        self.t_arrival = t_arrival
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.cached_tokens = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.num_tokens = 0
        self._clock = clock

    def on_token(self, cached_tokens: int = 0) -> None:
        now = self._clock()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.num_tokens += 1
        self.cached_tokens = max(self.cached_tokens, cached_tokens)


_COUNTERS = ("num_steps", "step_seconds", "step_tokens", "decode_steps", "decode_step_seconds", "decode_step_tokens",
             "loop_overhead_seconds", "loop_overhead_steps")


class LoadMonitor:
    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError("the load window must be > 0 s")
        self.window_s = window_s
        self.clock = clock
        self.t_start = clock()
        self._arrivals: deque[list] = deque()  # [second, arrivals in it]: bounded by the window, at any rate
        self._samples: deque[RequestSample] = deque(maxlen=MAX_SAMPLES)
        self._inflight: set[RequestTimer] = set()  # bounded by the server's admission limit
        # (time, {worker id: (role, counters)}): cumulative counters, one snapshot per observation
        self._snapshots: deque[tuple[float, dict[str, tuple[str, tuple]]]] = deque()

    # ---- what the gateway reports --------------------------------------------------------
    def start(self, prompt_tokens: int, max_tokens: int = 0) -> RequestTimer:
        now = self.clock()
        sec = int(now)
        if self._arrivals and self._arrivals[-1][0] == sec:
            self._arrivals[-1][1] += 1
        else:
            self._arrivals.append([sec, 1])
        self._trim(now)
        timer = RequestTimer(now, prompt_tokens, max_tokens, self.clock)
        self._inflight.add(timer)
        return timer

    def finish(self, timer: RequestTimer) -> None:
        now = self.clock()
        self._inflight.discard(timer)
        ttft = None if timer.t_first is None else timer.t_first - timer.t_arrival
        tpot = None
        if timer.num_tokens > 1 and timer.t_first is not None and timer.t_last is not None:
            tpot = (timer.t_last - timer.t_first) / (timer.num_tokens - 1)
        self._samples.append(RequestSample(now, timer.prompt_tokens, min(timer.cached_tokens, timer.prompt_tokens),
                                           timer.num_tokens, ttft, tpot))
        self._trim(now)

    def observe_workers(self, workers: Iterable[tuple[str, str, object]]) -> None:
        """(worker id, role, its latest messages.Stats or None) for every worker, once per interval."""
        now = self.clock()
        snap = {wid: (role, tuple(getattr(s, k, 0) for k in _COUNTERS)) for wid, role, s in workers if s is not None}
        self._snapshots.append((now, snap))
        self._trim(now)

    # ---- what the autoscaler reads --------------------------------------------------------
    def measure(self) -> LoadMeasurement:
        now = self.clock()
        self._trim(now)
        span = max(min(self.window_s, now - self.t_start), 1e-9)
        arrived = sum(n for _, n in self._arrivals)
        recent_s = span / 3
        recent = sum(n for sec, n in self._arrivals if sec >= now - recent_s)
        rate = max(arrived / span, recent / max(recent_s, 1.0))
        done = list(self._samples)
        waiting = [t for t in self._inflight if t.t_first is None]
        lens = [(s.prompt_tokens, s.output_tokens) for s in done]
        if len(lens) < MIN_FINISHED_FOR_LENGTHS:
            lens += [(t.prompt_tokens, max(t.max_tokens, 1)) for t in self._inflight]
        prompt = sum(s.prompt_tokens for s in done)
        cached = sum(s.cached_tokens for s in done)
        ttfts = [s.ttft_s * 1000.0 for s in done if s.ttft_s is not None] + [(now - t.t_arrival) * 1000.0 for t in waiting]
        tpot = percentile((s.tpot_s * 1000.0 for s in done if s.tpot_s is not None), SLO_PERCENTILE)
        return LoadMeasurement(
            window_s=span, arrival_rate=rate, num_arrivals=arrived,
            prompt_lens=tuple(p for p, _ in lens), output_lens=tuple(o for _, o in lens),
            prefix_hit_rate=cached / prompt if prompt else 0.0, ttft_ms=percentile(ttfts, SLO_PERCENTILE),
            tpot_ms=tpot, steps=self._step_times(), num_finished=len(done), num_waiting_first=len(waiting),
        )

    def _step_times(self) -> dict[str, StepTimes]:
        if len(self._snapshots) < 2:
            return {}
        (t0, old), (t1, new) = self._snapshots[0], self._snapshots[-1]
        sums: dict[str, list[float]] = {}
        workers: dict[str, int] = {}
        for wid, (role, now_c) in new.items():
            before = old.get(wid)
            # a worker that is new, or restarted (its counters began again), counts from zero
            base = before[1] if before is not None and before[1][0] <= now_c[0] else (0,) * len(_COUNTERS)
            acc = sums.setdefault(role, [0.0] * len(_COUNTERS))
            for i, (a, b) in enumerate(zip(now_c, base)):
                acc[i] += a - b
            workers[role] = workers.get(role, 0) + 1
        out = {}
        for role, (steps, secs, toks, dsteps, dsecs, dtoks, osecs, osteps) in sums.items():
            psteps = steps - dsteps
            out[role] = StepTimes(
                steps=int(steps), decode_steps=int(dsteps), decode_step_s=dsecs / dsteps if dsteps else 0.0,
                decode_batch=dtoks / dsteps if dsteps else 0.0, prefill_steps=int(psteps),
                prefill_step_s=(secs - dsecs) / psteps if psteps > 0 else 0.0,
                prefill_tokens_per_step=(toks - dtoks) / psteps if psteps > 0 else 0.0,
                busy_fraction=secs / max((t1 - t0) * workers[role], 1e-9),
                overhead_s=osecs / osteps if osteps else 0.0,
            )
        return out

    def _trim(self, now: float) -> None:
        cut = now - self.window_s
        while self._arrivals and self._arrivals[0][0] + 1 <= cut:
            self._arrivals.popleft()
        while self._samples and self._samples[0].t_end < cut:
            self._samples.popleft()
        # keep one snapshot at or before the cut: deltas then span the whole window
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= cut:
            self._snapshots.popleft()
