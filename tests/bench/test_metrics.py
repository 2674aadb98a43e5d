"""Metric math on hand-made records: every number known in advance."""

from __future__ import annotations

import numpy as np
import pytest

from splitserve.bench.metrics import compute_stats, compute_tpot, percentile, summarize
from splitserve.bench.schema import RequestRecord


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentile_matches_numpy(q, n):
    vals = sorted(np.random.default_rng(n).exponential(10.0, n).tolist())
    assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)), rel=1e-12, abs=1e-12)


def test_compute_stats_exact():
    st = compute_stats([4.0, 1.0, 3.0, 2.0, None])
    assert st.count == 4
    assert st.mean == 2.5
    assert st.min == 1.0 and st.max == 4.0
    assert st.p50 == 2.5
    assert st.p90 == pytest.approx(3.7)
    assert st.std == pytest.approx(np.std([1, 2, 3, 4]))
    assert compute_stats([]).count == 0 and compute_stats([]).p50 is None


def test_tpot_definition():
    assert compute_tpot(1100.0, 100.0, 11) == 100.0
    assert compute_tpot(100.0, 100.0, 1) is None
    assert compute_tpot(None, 100.0, 5) is None


def _rec(i, start, ttft, itl, out, *, ok=True, error=None, inp=10, chain=None, step=0, steps=1):
    e2e = ttft + sum(itl) if ok else 5.0
    return RequestRecord(
        request_id=i, start_s=start, ok=ok, ttft_ms=ttft if ok else None, e2e_ms=e2e,
        tpot_ms=compute_tpot(e2e, ttft, out) if ok else None, itl_ms=list(itl) if ok else [],
        input_tokens=inp if ok else None, output_tokens=out if ok else None, error=error,
        chain_id=chain, step=step, num_steps=steps,
    )


def test_summarize_known_values():
    recs = [
        _rec(0, 0.0, 100.0, [10.0, 10.0, 10.0], 4),  # tpot 10, e2e 130
        _rec(1, 0.5, 300.0, [20.0, 20.0, 20.0], 4),  # tpot 20, e2e 360 -> ends at 0.86
        _rec(2, 1.0, 50.0, [50.0], 2),  # tpot 50, e2e 100 -> ends at 1.1
        _rec(3, 1.5, 0, [], 0, ok=False, error="http_500"),
        _rec(4, 1.9, 0, [], 0, ok=False, error="timeout"),  # ends at 1.905
    ]
    s = summarize(recs, slo_ttft_ms=200.0, slo_tpot_ms=30.0)
    assert (s.num_requests, s.completed, s.failed) == (5, 3, 2)
    assert s.duration_s == pytest.approx(1.905)
    assert s.ttft_ms.mean == pytest.approx(150.0)
    assert s.ttft_ms.p50 == 100.0
    assert s.tpot_ms.mean == pytest.approx(80.0 / 3)
    assert s.itl_ms.count == 7
    assert s.itl_ms.mean == pytest.approx((30 + 60 + 50) / 7)
    assert s.e2e_ms.max == 360.0
    assert s.total_input_tokens == 30 and s.total_output_tokens == 10
    assert s.request_throughput == pytest.approx(3 / 1.905)
    assert s.output_token_throughput == pytest.approx(10 / 1.905)
    # goodput: #0 meets both, #1 misses TTFT, #2 misses TPOT, errors never meet
    assert s.goodput.count == 1
    assert s.goodput.fraction == pytest.approx(1 / 5)
    assert s.goodput.requests_per_s == pytest.approx(1 / 1.905)
    assert s.errors == {"http_500": 1, "timeout": 1}
    assert s.chain_ms is None


def test_summarize_explicit_duration_and_no_slo():
    recs = [_rec(0, 0.0, 10.0, [1.0], 2)]
    s = summarize(recs, duration_s=2.0)
    assert s.goodput is None
    assert s.request_throughput == 0.5
    only_ttft = summarize(recs, slo_ttft_ms=5.0)
    assert only_ttft.goodput.count == 0 and only_ttft.goodput.slo_tpot_ms is None


def test_single_token_request_meets_any_tpot_slo():
    s = summarize([_rec(0, 0.0, 10.0, [], 1)], slo_tpot_ms=0.001)
    assert s.goodput.count == 1
    assert s.tpot_ms.count == 0


def test_input_tokens_fall_back_to_expected():
    r = _rec(0, 0.0, 10.0, [1.0], 2, inp=None)
    r.expected_input_tokens = 77
    assert summarize([r]).total_input_tokens == 77


def test_chain_completion_times():
    recs = [
        _rec(0, 0.0, 100.0, [100.0], 2, chain=0, step=0, steps=2),  # 0.0 -> 0.2
        _rec(1, 0.2, 100.0, [100.0], 2, chain=0, step=1, steps=2),  # -> 0.4: chain 400 ms
        _rec(2, 0.0, 100.0, [], 1, chain=1, step=0, steps=2),  # -> 0.1
        _rec(3, 0.1, 100.0, [100.0, 100.0], 3, chain=1, step=1, steps=2),  # -> 0.4: chain 400 ms
        _rec(4, 0.0, 100.0, [], 1, chain=2, step=0, steps=2),  # chain 2 never finished step 1
        _rec(5, 0.1, 0, [], 0, ok=False, error="disconnect", chain=2, step=1, steps=2),
        _rec(6, 0.0, 100.0, [], 1, chain=3, step=0, steps=2),  # chain 3 stopped after step 0
    ]
    s = summarize(recs)
    assert s.num_chains == 4 and s.completed_chains == 2
    assert s.chain_ms.count == 2
    assert s.chain_ms.mean == pytest.approx(400.0)


def test_longest_gap_per_request_and_its_slo():
    """A request whose mean TPOT is fine but which stalls once between two tokens misses an ITL
    SLO; the per-request longest gap is reported as a distribution of its own."""
    steady = _rec(0, 0.0, 100.0, [20.0] * 10, 11)  # tpot 20, longest gap 20
    stall = _rec(1, 0.1, 100.0, [5.0] * 9 + [155.0], 11)  # tpot 20 too, but one 155 ms stall
    s = summarize([steady, stall], slo_ttft_ms=200.0, slo_tpot_ms=25.0)
    assert s.goodput.count == 2  # TPOT alone averages the stall away
    s = summarize([steady, stall], slo_ttft_ms=200.0, slo_tpot_ms=25.0, slo_itl_ms=100.0)
    assert s.goodput.count == 1 and s.goodput.slo_itl_ms == 100.0
    assert s.max_itl_ms.count == 2 and s.max_itl_ms.max == 155.0 and s.max_itl_ms.min == 20.0


def test_offered_rate_and_a_run_that_falls_behind_is_not_steady():
    """Arrivals at 10/s: a server that keeps up (constant 200 ms) is steady; one that completes
    5/s (each request waits for the ones before it) falls further behind and is flagged; all
    requests sent at once has no arrival process to keep up with."""
    keeps_up = [_rec(i, i * 0.1, 50.0, [150.0], 2) for i in range(200)]
    s = summarize(keeps_up)
    assert s.offered_rate == pytest.approx(10.0, rel=0.01)
    assert s.steady_state is True
    behind = [_rec(i, i * 0.1, 50.0 + i * 100.0, [150.0], 2) for i in range(200)]  # done at 0.2 s * i
    s = summarize(behind)
    assert s.request_throughput < 0.6 * s.offered_rate
    assert s.steady_state is False
    at_once = [_rec(i, 0.0, 50.0 + i * 100.0, [150.0], 2) for i in range(200)]
    assert summarize(at_once).steady_state is None and summarize(at_once).offered_rate is None
    assert summarize(keeps_up[:10]).steady_state is None  # too few to tell


def test_streaming_builder_matches_the_list_summary():
    """The simulator's streamed runs and bench's record lists share one builder: same numbers
    (ITL percentiles within the histogram's 0.5% bins)."""
    from splitserve.bench.metrics import SummaryBuilder

    rng = np.random.default_rng(3)
    recs = [_rec(i, i * 0.05, float(rng.uniform(10, 300)), rng.uniform(1, 40, 7).tolist(), 8) for i in range(300)]
    recs.append(_rec(300, 3.0, 0, [], 0, ok=False, error="timeout"))
    exact = summarize(recs, slo_ttft_ms=150.0, slo_itl_ms=35.0)
    b = SummaryBuilder(slo_ttft_ms=150.0, slo_itl_ms=35.0, exact_itl=False)
    for r in recs:
        b.add(r)
    streamed = b.summary()
    assert streamed.goodput == exact.goodput and streamed.ttft_ms == exact.ttft_ms
    assert streamed.max_itl_ms == exact.max_itl_ms and streamed.steady_state == exact.steady_state
    assert streamed.itl_ms.count == exact.itl_ms.count
    assert streamed.itl_ms.p90 == pytest.approx(exact.itl_ms.p90, rel=0.01)
