"""`splitserve simulate` and `splitserve plan` end to end (in process, small workloads)."""

from __future__ import annotations

import json

from splitserve.bench.schema import load_results
from splitserve.cli import main


def test_simulate_aggregated_writes_the_bench_schema(tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = main(["simulate", "--model", "llama-3.1-8b", "--hardware", "h100:2", "--rate", "10",
               "--num-requests", "60", "--input-len", "256", "--output-len", "32", "--output", str(out), "--quiet"])
    assert rc == 0
    (res,) = load_results(str(out))
    assert res.config.source == "sim" and res.summary.completed == 60 and len(res.requests) == 60
    dep = res.config.extra["deployment"]
    assert dep["pools"][0]["units"] == 2 and dep["pools"][0]["replicas"] == 2
    assert res.config.extra["sim"]["events_per_wall_s"] > 0
    text = capsys.readouterr().out
    assert "TTFT" in text and "per million output tokens" in text


def test_simulate_without_count_says_how_it_sized(capsys):
    rc = main(["simulate", "--model", "llama-3.1-70b", "--hardware", "cs3", "--num-requests", "5",
               "--input-len", "128", "--output-len", "8"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "4 x cs3" in err and "fewest cs3 units" in err


def test_simulate_disaggregated_and_sweep(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rc = main(["simulate", "--model", "llama-3.1-8b", "--prefill", "h100:1", "--decode", "h100:2", "--link", "ib-ndr",
               "--rate", "5,10", "--num-requests", "40", "--input-len", "512", "--output-len", "16",
               "--local-prefill-threshold", "64", "--output", str(out), "--quiet"])
    assert rc == 0
    runs = load_results(str(out))
    assert [r.config.rate for r in runs] == [5, 10]
    assert all(r.summary.completed == 40 for r in runs)
    assert [p["role"] for p in runs[0].config.extra["deployment"]["pools"]] == ["prefill", "decode"]


def test_simulate_agent_and_stream(tmp_path):
    recs = tmp_path / "recs.jsonl"
    out = tmp_path / "r.json"
    rc = main(["simulate", "--model", "llama-3.1-8b", "--hardware", "cs3", "--workload", "agent", "--sessions", "2",
               "--steps", "3", "--tool-tokens", "64", "--answer-tokens", "32", "--records-jsonl", str(recs),
               "--output", str(out), "--quiet"])
    assert rc == 0
    lines = [json.loads(x) for x in recs.read_text().splitlines()]
    assert len(lines) == 6 and {x["chain_id"] for x in lines} == {0, 1}
    (res,) = load_results(str(out))
    assert res.summary.completed_chains == 2 and res.requests == []


def test_simulate_usage_errors(capsys):
    assert main(["simulate", "--hardware", "h100", "--prefill", "h100", "--num-requests", "1"]) == 2
    assert main(["simulate", "--num-requests", "1"]) == 2
    assert main(["simulate", "--hardware", "h100:1", "--model", "llama-3.1-405b", "--num-requests", "1"]) == 2
    assert "cannot hold" in capsys.readouterr().err
    assert main(["simulate", "--hardware", "nope", "--num-requests", "1"]) == 2


def test_plan_finds_the_cheapest_deployment(capsys):
    rc = main(["plan", "--model", "llama-3.1-8b", "--rate", "4", "--num-requests", "40", "--input-len", "512",
               "--output-len", "32", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "50", "--candidates", "h100,cs3",
               "--max-replicas", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "best:" in out and "| h100 |" in out
