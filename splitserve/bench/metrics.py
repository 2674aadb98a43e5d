"""Aggregate metrics from per-request records. Pure: no clock, no I/O.

Definitions (all measured at the client, see docs/bench.md):
  TTFT  send -> first content token (a chunk carrying text; the role-only chunk does not count)
  ITL   every gap between consecutive content chunks, pooled over completed requests
  TPOT  per request: (e2e - ttft) / (output_tokens - 1); undefined for fewer than 2 tokens
  E2E   send -> end of the stream
Percentiles interpolate linearly between closest ranks (numpy's default "linear" method).
Throughputs count completed requests only, over the run's duration (first send -> last end,
unless the caller passes the measured duration).
Goodput counts completed requests whose TTFT <= slo_ttft_ms and TPOT <= slo_tpot_ms (a request
with one output token has no TPOT and meets any TPOT SLO); it is None when no SLO is given.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

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


def meets_slo(r: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if not r.ok:
        return False
    if slo_ttft_ms is not None and (r.ttft_ms is None or r.ttft_ms > slo_ttft_ms):
        return False
    if slo_tpot_ms is not None:
        tpot = r.tpot_ms if r.tpot_ms is not None else compute_tpot(r.e2e_ms, r.ttft_ms, r.output_tokens)
        if tpot is not None and tpot > slo_tpot_ms:
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
    interrupted: bool = False,
) -> Summary:
    duration = run_span_s(records) if duration_s is None else duration_s
    ok = [r for r in records if r.ok]
    s = Summary(num_requests=len(records), completed=len(ok), failed=len(records) - len(ok))
    s.duration_s = duration
    s.interrupted = interrupted
    s.total_input_tokens = sum(_input_tokens(r) for r in ok)
    s.total_output_tokens = sum(r.output_tokens or 0 for r in ok)
    if duration > 0:
        s.request_throughput = len(ok) / duration
        s.input_token_throughput = s.total_input_tokens / duration
        s.output_token_throughput = s.total_output_tokens / duration
        s.total_token_throughput = (s.total_input_tokens + s.total_output_tokens) / duration

    s.ttft_ms = compute_stats(r.ttft_ms for r in ok)
    s.tpot_ms = compute_stats(
        r.tpot_ms if r.tpot_ms is not None else compute_tpot(r.e2e_ms, r.ttft_ms, r.output_tokens)
        for r in ok
    )
    s.itl_ms = compute_stats(x for r in ok for x in r.itl_ms)
    s.e2e_ms = compute_stats(r.e2e_ms for r in ok)

    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(1 for r in ok if meets_slo(r, slo_ttft_ms, slo_tpot_ms))
        s.goodput = Goodput(
            slo_ttft_ms=slo_ttft_ms,
            slo_tpot_ms=slo_tpot_ms,
            count=good,
            requests_per_s=good / duration if duration > 0 else 0.0,
            fraction=good / len(records) if records else 0.0,
        )

    s.errors = dict(sorted(Counter(r.error or "unknown" for r in records if not r.ok).items()))

    chains: dict[int, list[RequestRecord]] = defaultdict(list)
    for r in records:
        if r.chain_id is not None:
            chains[r.chain_id].append(r)
    if chains:
        s.num_chains = len(chains)
        times = []
        for steps in chains.values():
            if len(steps) == steps[0].num_steps and all(r.ok for r in steps):
                start = min(r.start_s for r in steps)
                end = max(r.start_s + (r.e2e_ms or 0.0) / 1000.0 for r in steps)
                times.append((end - start) * 1000.0)
        s.completed_chains = len(times)
        s.chain_ms = compute_stats(times)
    return s


def _input_tokens(r: RequestRecord) -> int:
    if r.input_tokens is not None:
        return r.input_tokens
    return r.expected_input_tokens or 0
