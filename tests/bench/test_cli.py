"""`splitserve bench` end to end against the fake server (in a thread): every workload, JSON,
Markdown, compare, plots, sweeps, usage errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from splitserve.bench import report
from splitserve.bench.cli import build_parser, main
from splitserve.bench.fakeserver import FakeServerThread, Script
from splitserve.bench.schema import load_results


@pytest.fixture(scope="module")
def server():
    with FakeServerThread(Script(ttft_s=0.005, itl_s=0.001)) as srv:
        yield srv


def _run(server, *args) -> int:
    return main(["--base-url", server.base_url, "--quiet", *args])


def test_synthetic_run_writes_json_and_markdown(server, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = _run(server, "--num-requests", "6", "--concurrency", "2", "--input-len", "uniform:10:20",
              "--output-len", "5", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "1000", "--seed", "7",
              "--label", "unit", "--output", str(out))
    assert rc == 0
    text = capsys.readouterr().out
    assert "| TTFT |" in text and "| TPOT |" in text and "goodput" in text
    (r,) = load_results(str(out))
    c, s = r.config, r.summary
    assert c.model == "fake-model" and c.concurrency == 2 and c.seed == 7 and c.label == "unit"
    assert c.workload == {"name": "synthetic", "input_len": "uniform:10:20", "output_len": "5"}
    assert c.tokenizer.startswith("approx")
    assert s.completed == 6 and s.goodput.fraction == 1.0
    assert all(rec.output_tokens == 5 and rec.token_source == "usage" for rec in r.requests)
    data = json.loads(out.read_text())
    assert data["summary"]["ttft_ms"]["p50"] > 0


@pytest.mark.parametrize("args, check", [
    (["--workload", "shared-prefix", "--prefix-len", "50", "--num-prefixes", "2", "--num-requests", "4",
      "--output-len", "3"], lambda r: r.summary.completed == 4 and r.config.workload["prefix_len"] == 50),
    (["--workload", "agent", "--sessions", "2", "--steps", "3", "--tool-tokens", "8", "--answer-tokens", "4"],
     lambda r: r.summary.completed_chains == 2 and r.summary.chain_ms.count == 2 and len(r.requests) == 6
     and r.config.concurrency == 2),
    (["--workload", "azure-code", "--num-requests", "3", "--rate", "200"],
     lambda r: r.summary.completed == 3 and "Splitwise" in r.config.workload["source"]),
    (["--endpoint", "completions", "--num-requests", "3", "--rate", "100", "--arrival", "gamma",
      "--burstiness", "0.5", "--output-len", "2"],
     lambda r: r.summary.completed == 3 and r.config.arrival == "gamma" and r.config.burstiness == 0.5),
])
def test_workloads_via_cli(server, tmp_path, args, check):
    out = tmp_path / "r.json"
    assert _run(server, *args, "--output", str(out)) == 0
    (r,) = load_results(str(out))
    assert r.summary.failed == 0
    assert check(r)


def test_trace_replay_via_cli(server, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps(x) for x in [
        {"timestamp": 100.0, "input_length": 12, "output_length": 3},
        {"timestamp": 100.1, "messages": [{"role": "user", "content": "hi"}], "output_length": 2},
        {"timestamp": 100.2, "input_length": 5, "output_length": 4},
    ]))
    out = tmp_path / "r.json"
    assert _run(server, "--workload", "trace", "--trace", str(trace), "--output", str(out)) == 0
    (r,) = load_results(str(out))
    assert [x.output_tokens for x in r.requests] == [3, 2, 4]
    assert r.requests[2].start_s == pytest.approx(0.2, abs=0.05)
    assert r.config.arrival == "trace"


def test_sweep_compare_and_plots(server, tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    plots = tmp_path / "plots"
    assert _run(server, "--num-requests", "4", "--rate", "100,200", "--output-len", "3",
                "--slo-ttft-ms", "500", "--output", str(sweep), "--plot-dir", str(plots)) == 0
    runs = load_results(str(sweep))
    assert [r.config.rate for r in runs] == [100.0, 200.0]
    for name in ("rate100_cdf.png", "rate200_latency_over_time.png", "sweep.png"):  # named by rate, not index
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [report._plot_title(r).split("@ ")[1] for r in runs] == ["rate 100 req/s", "rate 200 req/s"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert _run(server, "--num-requests", "3", "--output", str(a)) == 0
    assert _run(server, "--num-requests", "3", "--output-len", "6", "--output", str(b)) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "| metric | a.json | b.json | change |" in table and "TTFT p50" in table
    assert "workloads differ" in captured.err and "workload.output_len" in captured.err
    assert main(["compare", str(a), str(a)]) == 0
    assert "differ" not in capsys.readouterr().err
    assert main(["plot", str(a), "--out", str(tmp_path / "p2")]) == 0
    assert (tmp_path / "p2" / "cdf.png").exists()
    assert main(["compare", str(a), str(sweep)]) == 2


@pytest.mark.parametrize("args", [
    ["--rate", "0"],
    ["--rate", "fast"],
    ["--workload", "nope"],
    ["--duration", "1"],
    ["--input-len", "uniform:9"],
    ["--extra-body", "[1]"],
    ["--workload", "trace"],
    ["--header", "no-colon"],
])
def test_usage_errors_exit_2(server, args, capsys):
    assert _run(server, *args) == 2
    assert "splitserve bench:" in capsys.readouterr().err


def test_unreachable_server_exits_2_without_model(capsys):
    assert main(["--base-url", "http://127.0.0.1:9", "--quiet", "--num-requests", "1"]) == 2


def test_errors_are_counted_with_progress_bar(tmp_path, capsys):
    with FakeServerThread(lambda i, body: Script(status=500) if i % 2 else Script()) as srv:
        out = tmp_path / "r.json"
        assert main(["--base-url", srv.base_url, "--num-requests", "6", "--concurrency", "1",
                     "--output", str(out)]) == 0
    (r,) = load_results(str(out))
    assert r.summary.errors == {"http_500": 3} and r.summary.completed == 3
    assert "errors | http_500: 3" in capsys.readouterr().out


def test_ctrl_c_writes_partial_results(tmp_path):
    with FakeServerThread(lambda i, body: Script(hang=True) if i >= 3 else Script()) as srv:
        out = tmp_path / "partial.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.cli", "bench", "--base-url", srv.base_url, "--num-requests", "100",
             "--concurrency", "2", "--output", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.time() + 60
        while srv.server.num_requests < 5 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "partial results" in stdout
    (r,) = load_results(str(out))
    assert r.summary.interrupted
    assert r.summary.completed == 3 and r.summary.errors == {"cancelled": 2}


def test_help_states_each_default_once():
    text = build_parser().format_help()
    for line in text.replace("\n                       ", " ").splitlines():
        assert line.count("(default") <= 1, line
    assert "(default: 600.0)" in text  # a plain default is still shown
