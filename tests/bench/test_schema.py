"""Results schema: JSON round trip, sweeps, forward compatibility."""

from __future__ import annotations

import json
import math

import pytest

from splitserve.bench.metrics import summarize
from splitserve.bench.schema import (
    BenchResult, RequestRecord, RunConfig, SCHEMA_VERSION, load_results, result_from_dict, to_dict, write_json,
)


def _result(rate=2.0) -> BenchResult:
    recs = [
        RequestRecord(0, 0.0, ok=True, ttft_ms=10.0, e2e_ms=30.0, tpot_ms=10.0, itl_ms=[10.0, 10.0],
                      input_tokens=5, output_tokens=3, token_source="usage", expected_input_tokens=5,
                      expected_output_tokens=3),
        RequestRecord(1, 0.5, ok=False, e2e_ms=2.0, error="http_500", http_status=500, error_detail="boom"),
    ]
    cfg = RunConfig(base_url="http://x", model="m", workload={"name": "synthetic", "input_len": "5"}, rate=rate,
                    arrival="poisson", slo_ttft_ms=100.0, seed=1)
    return BenchResult(cfg, summarize(recs, slo_ttft_ms=100.0), recs)


def test_round_trip(tmp_path):
    r = _result()
    path = str(tmp_path / "r.json")
    write_json(path, r)
    data = json.load(open(path))
    assert data["schema_version"] == SCHEMA_VERSION and data["kind"] == "splitserve.bench.result"
    assert data["summary"]["ttft_ms"]["p50"] == 10.0
    assert data["summary"]["tpot_ms"]["mean"] == 10.0
    assert data["summary"]["goodput"]["count"] == 1
    assert data["summary"]["errors"] == {"http_500": 1}
    assert data["requests"][1]["error"] == "http_500"
    (back,) = load_results(path)
    assert to_dict(back) == to_dict(r)
    assert back.summary.ttft_ms.p50 == 10.0 and back.requests[0].itl_ms == [10.0, 10.0]


def test_sweep_file(tmp_path):
    path = str(tmp_path / "s.json")
    write_json(path, [_result(1.0), _result(2.0)])
    runs = load_results(path)
    assert [r.config.rate for r in runs] == [1.0, 2.0]


def test_nan_becomes_null_and_unknown_keys_are_ignored():
    r = _result()
    r.summary.request_throughput = math.nan
    d = to_dict(r)
    assert d["summary"]["request_throughput"] is None
    json.dumps(d, allow_nan=False)
    d["summary"]["a_future_metric"] = 1
    d["config"]["future_option"] = True
    d["requests"][0]["future_field"] = "x"
    back = result_from_dict(d)
    assert back.requests[0].ttft_ms == 10.0


def test_rejects_other_documents():
    with pytest.raises(ValueError):
        result_from_dict({"kind": "something.else"})
    with pytest.raises(ValueError):
        result_from_dict({"kind": "splitserve.bench.result", "schema_version": SCHEMA_VERSION + 1})
