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
