"""Workload generation: pure, deterministic, bounded."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from splitserve.bench import workloads as wl
from splitserve.bench.tokenizer import ApproxTokenizer, corpus_text


@pytest.fixture(scope="module")
def text():
    return wl.TextSource(ApproxTokenizer(), corpus_text(60_000))


def test_parse_length_forms():
    assert wl.parse_length("128") == wl.LengthDist.fixed(128)
    assert wl.parse_length(64).value == 64
    assert wl.parse_length("uniform:10:20") == wl.LengthDist.uniform(10, 20)
    d = wl.parse_length("lognormal:100:0.5:5:300")
    assert (d.kind, d.median, d.sigma, d.low, d.high) == ("lognormal", 100.0, 0.5, 5, 300)
    assert wl.parse_length(d.describe()) == d
    for bad in ("0", "uniform:5", "uniform:9:3", "weird:1", "lognormal:-1:1", "abc"):
        with pytest.raises(ValueError):
            wl.parse_length(bad)


def test_length_distributions_sample_in_bounds():
    rng = random.Random(0)
    u = [wl.LengthDist.uniform(3, 7).sample(rng) for _ in range(2000)]
    assert min(u) == 3 and max(u) == 7
    d = wl.LengthDist.lognormal(200, 0.8, 10, 1000)
    xs = [d.sample(rng) for _ in range(4000)]
    assert 10 <= min(xs) and max(xs) <= 1000
    assert statistics.median(xs) == pytest.approx(200, rel=0.08)


def test_lognormal_from_mean():
    d = wl.LengthDist.lognormal_from_mean(100, 150)
    assert math.exp(d.sigma**2 / 2) * 100 == pytest.approx(150)


def test_synthetic_deterministic_and_fixed(text):
    a = list(wl.synthetic(input_len=50, output_len=7, num_requests=5, seed=3, text=text))
    b = list(wl.synthetic(input_len=50, output_len=7, num_requests=5, seed=3, text=text))
    c = list(wl.synthetic(input_len=50, output_len=7, num_requests=5, seed=4, text=text))
    assert a == b and a != c
    assert [s.request_id for s in a] == list(range(5))
    for s in a:
        assert (s.input_len, s.output_len, s.arrival_s) == (50, 7, None)
        assert len(s.prompt_token_ids) == 50 and s.prompt
        assert len(text.tokenizer.encode(s.prompt)) == 50


def test_lengths_do_not_depend_on_rate():
    kw = dict(input_len="uniform:1:1000", output_len="uniform:1:100", num_requests=50, seed=9)
    slow = list(wl.synthetic(arrival=wl.Arrival(1.0), **kw))
    fast = list(wl.synthetic(arrival=wl.Arrival(100.0), **kw))
    assert [s.input_len for s in slow] == [s.input_len for s in fast]
    assert slow[10].arrival_s == pytest.approx(100 * fast[10].arrival_s)


def test_arrival_processes():
    rng = random.Random(1)
    const = wl.Arrival(4.0, "constant").times(rng)
    assert [next(const) for _ in range(4)] == [0.0, 0.25, 0.5, 0.75]
    inf = wl.Arrival(math.inf).times(rng)
    assert [next(inf) for _ in range(3)] == [0.0, 0.0, 0.0]
    for kind, burst in (("poisson", 1.0), ("gamma", 0.25), ("gamma", 4.0)):
        it = wl.Arrival(10.0, kind, burst).times(random.Random(2))
        ts = [next(it) for _ in range(20001)]
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(0.1, rel=0.05)
        cv = statistics.pstdev(gaps) / mean  # gamma: CV = 1/sqrt(shape)
        assert cv == pytest.approx(1 / math.sqrt(burst), rel=0.08)
    with pytest.raises(ValueError):
        wl.Arrival(0.0)
    with pytest.raises(ValueError):
        wl.Arrival(1.0, "gamma", 0.0)


def test_duration_bounds_open_loop():
    specs = list(wl.synthetic(num_requests=None, duration_s=2.0, arrival=wl.Arrival(5.0, "constant")))
    assert len(specs) == 10 and specs[-1].arrival_s == pytest.approx(1.8)
    both = list(wl.synthetic(num_requests=3, duration_s=2.0, arrival=wl.Arrival(5.0, "constant")))
    assert len(both) == 3
    with pytest.raises(ValueError):
        wl.synthetic()


def test_closed_loop_duration_is_unbounded_but_capped(monkeypatch):
    monkeypatch.setattr(wl, "MAX_REQUESTS", 7)
    assert len(list(wl.synthetic(duration_s=1.0))) == 7


def test_shared_prefix(text):
    specs = list(wl.shared_prefix(prefix_len=100, input_len=20, output_len=5, num_prefixes=2,
                                  num_requests=6, text=text))
    assert {s.prefix_group for s in specs} == {0, 1}
    g0 = [s for s in specs if s.prefix_group == 0]
    assert len({s.system for s in g0}) == 1 and len(g0[0].system_token_ids) == 100
    assert specs[0].system != specs[1].system
    assert len({s.prompt for s in specs}) == 6
    assert all(s.input_len == 120 and s.shared_prefix_len == 100 for s in specs)


def test_agent_chains_structure(text):
    specs = list(wl.agent_chains(num_chains=3, steps=4, tool_tokens=30, answer_tokens=10,
                                 input_len=50, system_len=20, text=text))
    assert len(specs) == 12
    units = list(wl.iter_units(specs))
    assert [len(u) for u in units] == [4, 4, 4]
    for c, unit in enumerate(units):
        assert [s.step for s in unit] == [0, 1, 2, 3]
        assert all(s.chain_id == c and s.num_steps == 4 for s in unit)
        assert [s.input_len for s in unit] == [70, 110, 150, 190]  # 20 + 50 + k * (10 + 30)
        assert unit[0].arrival_s is None and all(s.arrival_s is None for s in unit[1:])
        assert len(unit[0].prompt_token_ids) == 50 and len(unit[1].prompt_token_ids) == 30
        assert unit[0].system and len(unit[0].system_token_ids) == 20
    timed = list(wl.agent_chains(num_chains=2, steps=2, arrival=wl.Arrival(2.0, "constant")))
    assert [s.arrival_s for s in timed] == [0.0, None, 0.5, None]


def test_presets_cite_and_match_medians():
    for name in ("azure-code", "azure-conv"):
        p = wl.PRESETS[name]
        assert "Azure" in p.source
    code = wl.PRESETS["azure-code"]
    rng = random.Random(0)
    ins = [code.input_len.sample(rng) for _ in range(4000)]
    outs = [code.output_len.sample(rng) for _ in range(4000)]
    assert statistics.median(ins) == pytest.approx(1469, rel=0.08)
    assert statistics.median(outs) == pytest.approx(13, rel=0.15)
    assert max(ins) <= 7437
    conv = list(wl.preset("azure-conv", num_requests=3, seed=1))
    assert len(conv) == 3
    with pytest.raises(ValueError):
        wl.preset("nope", num_requests=1)


def test_trace_parsing_and_replay():
    lines = [
        json.dumps({"timestamp": 10.0, "input_length": 100, "output_length": 20}),
        "",
        "# comment",
        json.dumps({"timestamp": 12.5, "messages": [{"role": "user", "content": "hello there"}], "output_length": 5}),
        json.dumps({"TIMESTAMP": "2023-11-16 18:15:46.6805900", "ContextTokens": 7, "GeneratedTokens": 3}),
    ]
    rows = wl.parse_trace_lines(lines[:4])
    assert len(rows) == 2 and rows[1].messages[0]["content"] == "hello there"
    specs = list(wl.trace_replay(rows, time_scale=2.0))
    assert [s.arrival_s for s in specs] == [0.0, 1.25]
    assert specs[0].input_len == 100 and specs[0].prompt is None
    assert specs[1].messages is not None and specs[1].input_len >= 1
    azure = wl.parse_trace_lines(lines[4:])
    assert azure[0].input_len == 7 and azure[0].output_len == 3
    ms = wl.parse_trace_lines([json.dumps({"timestamp": 1500, "input_length": 1, "output_length": 1})], time_unit_s=0.001)
    assert ms[0].timestamp == 1.5
    closed = list(wl.trace_replay(rows, closed_loop=True, num_requests=1))
    assert len(closed) == 1 and closed[0].arrival_s is None


@pytest.mark.parametrize("line", [
    "not json",
    json.dumps({"input_length": 5, "output_length": 5}),
    json.dumps({"timestamp": 0, "input_length": 5}),
    json.dumps({"timestamp": 0, "output_length": 5}),
    json.dumps({"timestamp": 0, "input_length": 0, "output_length": 5}),
    json.dumps({"timestamp": 0, "messages": "x", "output_length": 5}),
    json.dumps([1, 2]),
])
def test_trace_bad_lines_name_their_line(line):
    with pytest.raises(ValueError, match="trace line 2"):
        wl.parse_trace_lines(["", line])


def test_text_source_with_real_tokenizer():
    from splitserve.bench.tokenizer import load_tokenizer

    tok = load_tokenizer("demo")
    if tok.name.startswith("approx"):
        pytest.skip(f"demo tokenizer not available: {tok.name}")
    src = wl.TextSource(tok, corpus_text(40_000))
    rng = random.Random(0)
    for n in (1, 17, 256):
        ids, s = src.sample(n, rng)
        assert len(ids) == n
        assert abs(len(tok.encode(s)) - n) <= 2


def test_approx_tokenizer_round_trip():
    tok = ApproxTokenizer()
    text = "Hello, world! The year 2024 was 12345 days."
    assert tok.decode(tok.encode(text)) == text
    assert tok.count(text) == len(tok.encode(text))
