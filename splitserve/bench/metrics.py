"""Aggregate metrics from per-request records. Pure: no clock, no I/O.

Definitions (all measured at the client, see docs/bench.md):
  TTFT  send -> first content token (a chunk carrying text; the role-only chunk does not count)
  ITL   every gap between consecutive content chunks, pooled over completed requests
  TPOT  per request: (e2e - ttft) / (output_tokens - 1); undefined for fewer than 2 tokens
  E2E   send -> end of the stream
Percentiles interpolate linearly between closest ranks (numpy's default "linear" method).
Throughputs count completed requests only, over the run's duration (first send -> last end,
unless the caller passes the measured duration).
Goodput counts completed requests whose TTFT <= slo_ttft_ms, TPOT <= slo_tpot_ms and longest gap
between two tokens <= slo_itl_ms (a request with one output token has no TPOT and no gap and meets
those SLOs); it is None when no SLO is given.
MAX ITL  per request: its longest gap between two content chunks (a stall a mean TPOT hides).
Offered rate: requests sent over the span of their send times; a run is not steady when its later
requests take much longer than its earlier ones (see steady_state).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from splitserve.bench.schema import Goodput, RequestRecord, Stats, Summary


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """q in [0, 100]; `sorted_values` ascending and non-empty. Same as numpy.percentile(..., q)."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of an empty sequence")
    if n == 1:
        return float(sorted_values[0])
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    a, b = sorted_values[lo], sorted_values[hi]
    return float(a + (b - a) * frac)


def compute_stats(values: Iterable[float]) -> Stats:
    vals = sorted(v for v in values if v is not None)
    n = len(vals)
    if n == 0:
        return Stats()
    mean = math.fsum(vals) / n
    var = math.fsum((v - mean) ** 2 for v in vals) / n  # population std, like numpy.std
    return Stats(
        count=n,
        mean=mean,
        std=math.sqrt(var),
        min=float(vals[0]),
        p50=percentile(vals, 50),
        p90=percentile(vals, 90),
        p95=percentile(vals, 95),
        p99=percentile(vals, 99),
        max=float(vals[-1]),
    )


def compute_tpot(e2e_ms: float | None, ttft_ms: float | None, output_tokens: int | None) -> float | None:
    if e2e_ms is None or ttft_ms is None or output_tokens is None or output_tokens < 2:
        return None
    return (e2e_ms - ttft_ms) / (output_tokens - 1)


def meets_slo(r: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None,
              slo_itl_ms: float | None = None) -> bool:
    """The one SLO check (bench, simulate and plan all count goodput with it)."""
    if not r.ok:
        return False
    if slo_ttft_ms is not None and (r.ttft_ms is None or r.ttft_ms > slo_ttft_ms):
        return False
    if slo_tpot_ms is not None:
        tpot = r.tpot_ms if r.tpot_ms is not None else compute_tpot(r.e2e_ms, r.ttft_ms, r.output_tokens)
        if tpot is not None and tpot > slo_tpot_ms:
            return False
    if slo_itl_ms is not None and r.itl_ms and max(r.itl_ms) > slo_itl_ms:
        return False
    return True


def run_span_s(records: Sequence[RequestRecord]) -> float:
    """First send -> last end (a failed request ends at its error), in seconds."""
    if not records:
        return 0.0
    start = min(r.start_s for r in records)
    end = max(r.start_s + (r.e2e_ms or 0.0) / 1000.0 for r in records)
    return max(end - start, 0.0)


def summarize(
    records: Sequence[RequestRecord],
    *,
    duration_s: float | None = None,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    slo_itl_ms: float | None = None,
    interrupted: bool = False,
) -> Summary:
    b = SummaryBuilder(slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, slo_itl_ms=slo_itl_ms)
    for r in records:
        b.add(r)
    return b.summary(duration_s=duration_s, interrupted=interrupted)


class SummaryBuilder:
    """A Summary built one record at a time: `summarize` feeds it a list, the simulator feeds it
    as requests finish (a million-request run keeps compact arrays, not records). With
    `exact_itl=False` pooled gaps go to a log histogram (0.5% bins) instead of a list."""

    def __init__(self, *, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                 slo_itl_ms: float | None = None, exact_itl: bool = True) -> None:
        self.slo = (slo_ttft_ms, slo_tpot_ms, slo_itl_ms)
        self.any_slo = any(x is not None for x in self.slo)
        self.n = self.ok = self.good = 0
        self.in_tokens = self.out_tokens = 0
        self.first_start, self.last_start, self.last_end = math.inf, -math.inf, 0.0
        self.ttft, self.tpot, self.e2e = array("d"), array("d"), array("d")
        self.starts = array("d")  # of completed requests, beside e2e: the steady-state check
        self.all_starts = array("d")
        self.max_gap = array("d")  # per request: its longest gap between two tokens
        # exact: each record's own list, kept by reference (pooled only when summarised)
        self.itl: Any = [] if exact_itl else LogHistogram()
        self.errors: Counter = Counter()
        self.chains: dict[int, list] = {}  # chain_id -> [start, end, steps ok, num_steps]

    def add(self, r: RequestRecord) -> None:
        self.n += 1
        self.all_starts.append(r.start_s)
        end = r.start_s + (r.e2e_ms or 0.0) / 1000.0
        if r.start_s < self.first_start:
            self.first_start = r.start_s
        if r.start_s > self.last_start:
            self.last_start = r.start_s
        if end > self.last_end:
            self.last_end = end
        if r.ok:
            self.ok += 1
            self.in_tokens += _input_tokens(r)
            self.out_tokens += r.output_tokens or 0
            if r.ttft_ms is not None:
                self.ttft.append(r.ttft_ms)
            tpot = r.tpot_ms if r.tpot_ms is not None else compute_tpot(r.e2e_ms, r.ttft_ms, r.output_tokens)
            if tpot is not None:
                self.tpot.append(tpot)
            if r.e2e_ms is not None:
                self.e2e.append(r.e2e_ms)
                self.starts.append(r.start_s)
            if r.itl_ms:
                self.max_gap.append(max(r.itl_ms))
                if type(self.itl) is list:
                    self.itl.append(r.itl_ms)
                else:
                    self.itl.extend(r.itl_ms)
            if self.any_slo and meets_slo(r, *self.slo):
                self.good += 1
        else:
            self.errors[r.error or "unknown"] += 1
        if r.chain_id is not None:
            c = self.chains.setdefault(r.chain_id, [r.start_s, end, 0, r.num_steps])
            c[0] = min(c[0], r.start_s)
            c[1] = max(c[1], end)
            c[2] += 1 if r.ok else 0

    def summary(self, *, duration_s: float | None = None, interrupted: bool = False) -> Summary:
        span = max(self.last_end - self.first_start, 0.0) if self.n else 0.0
        dur = span if duration_s is None else duration_s
        s = Summary(num_requests=self.n, completed=self.ok, failed=self.n - self.ok, duration_s=dur,
                    interrupted=interrupted, total_input_tokens=self.in_tokens, total_output_tokens=self.out_tokens)
        if dur > 0:
            s.request_throughput = self.ok / dur
            s.input_token_throughput = self.in_tokens / dur
            s.output_token_throughput = self.out_tokens / dur
            s.total_token_throughput = (self.in_tokens + self.out_tokens) / dur
        s.ttft_ms = compute_stats(self.ttft)
        s.tpot_ms = compute_stats(self.tpot)
        s.e2e_ms = compute_stats(self.e2e)
        s.max_itl_ms = compute_stats(self.max_gap)
        s.itl_ms = compute_stats(x for gaps in self.itl for x in gaps) if type(self.itl) is list else self.itl.stats()
        if self.any_slo:
            slo_ttft, slo_tpot, slo_itl = self.slo
            s.goodput = Goodput(slo_ttft, slo_tpot, self.good, self.good / dur if dur > 0 else 0.0,
                                self.good / self.n if self.n else 0.0, slo_itl_ms=slo_itl)
        s.errors = dict(sorted(self.errors.items()))
        if self.chains:
            s.num_chains = len(self.chains)
            times = [(c[1] - c[0]) * 1000.0 for c in self.chains.values() if c[2] == c[3]]
            s.completed_chains = len(times)
            s.chain_ms = compute_stats(times)
        if self.n > 1 and self.last_start > self.first_start:
            s.offered_rate = (self.n - 1) / (self.last_start - self.first_start)
        s.steady_state = steady_state(self.all_starts, self.starts, self.e2e)
        return s


# A run never reached a steady state when it completed requests at under STEADY_MIN_COMPLETION of
# the rate they arrived (a pool falling ever further behind), or when its later requests took over
# STEADY_GROWTH_LIMIT x longer than its earlier ones (a queue or a stall still growing at the end).
STEADY_MIN_COMPLETION = 0.8
STEADY_GROWTH_LIMIT = 1.5
STEADY_MIN_REQUESTS = 40


def steady_state(all_starts: Sequence[float], starts: Sequence[float], e2e_ms: Sequence[float]) -> bool | None:
    """`all_starts`: every request's send time; `starts`, `e2e_ms`: the completed ones'.
    Completion: the rate at which requests finished between the 10th and 90th percentile of their
    end times, against the rate they were sent (first to last send): a deployment that keeps up
    finishes them as fast as they come, however long each takes. Growth: the median end-to-end
    time of the last quarter of requests (by send time) against the second quarter's (the first is
    warm-up). None with too few completed requests to tell, or when every request was sent at once
    (no arrival process to keep up with)."""
    n = len(e2e_ms)
    if n < STEADY_MIN_REQUESTS or max(all_starts) <= min(all_starts):
        return None
    offered = (len(all_starts) - 1) / (max(all_starts) - min(all_starts))
    ends = sorted(a + e / 1000.0 for a, e in zip(starts, e2e_ms))
    lo, hi = int(0.1 * n), int(0.9 * n)
    if ends[hi] > ends[lo] and (hi - lo) / (ends[hi] - ends[lo]) < STEADY_MIN_COMPLETION * offered:
        return False
    order = sorted(range(n), key=starts.__getitem__)
    q = n // 4
    second = sorted(e2e_ms[i] for i in order[q:2 * q])
    last = sorted(e2e_ms[i] for i in order[n - q:])
    return percentile(last, 50) <= STEADY_GROWTH_LIMIT * max(percentile(second, 50), 1e-9)


def health_line(s: Summary) -> str:
    """One line under every result: offered vs completed rate, steady state, the longest stall."""
    parts = []
    if s.offered_rate is not None:
        parts.append(f"offered {s.offered_rate:.3g} req/s, completed {s.request_throughput:.3g} req/s")
    if s.steady_state is False:
        parts.append("NOT STEADY: the deployment fell behind its arrivals (overloaded; this run's averages and "
                     "SLO attainment understate how far)")
    if s.max_itl_ms.count:
        parts.append(f"longest gap between two tokens: p50 {s.max_itl_ms.p50:.1f} ms, max {s.max_itl_ms.max:.1f} ms")
    return "; ".join(parts)


class LogHistogram:
    """Percentiles of a huge stream (pooled ITLs) in bounded memory: 0.5%-wide log bins."""

    BINS_PER_DECADE = 460

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0.0
        self.sq = 0.0
        self.min = math.inf
        self.max = -math.inf

    def extend(self, values: Sequence[float]) -> None:
        c = self.counts
        k = self.BINS_PER_DECADE
        for v in values:
            b = int(math.floor(math.log10(v) * k)) if v > 0 else -10**9
            c[b] = c.get(b, 0) + 1
            self.total += v
            self.sq += v * v
            if v < self.min:
                self.min = v
            if v > self.max:
                self.max = v
        self.n += len(values)

    def quantile(self, q: float) -> float:
        target = q / 100.0 * (self.n - 1)
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen > target:
                return 0.0 if b == -10**9 else 10 ** ((b + 0.5) / self.BINS_PER_DECADE)
        return self.max

    def stats(self) -> Stats:
        if not self.n:
            return Stats()
        mean = self.total / self.n
        return Stats(count=self.n, mean=mean, std=math.sqrt(max(self.sq / self.n - mean * mean, 0.0)), min=self.min,
                     p50=self.quantile(50), p90=self.quantile(90), p95=self.quantile(95), p99=self.quantile(99),
                     max=self.max)


def _input_tokens(r: RequestRecord) -> int:
    if r.input_tokens is not None:
        return r.input_tokens
    return r.expected_input_tokens or 0
