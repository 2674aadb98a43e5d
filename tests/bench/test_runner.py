"""The load runner against scripted fake servers: arrivals, concurrency, duration, chains, stop;
and the summary metrics end to end, with TTFT, ITL, TPOT and goodput known in advance."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.bench import workloads as wl
from splitserve.bench.client import OpenAIClient
from splitserve.bench.fakeserver import Script
from splitserve.bench.metrics import summarize
from splitserve.bench.runner import LiveCounters, run_load
from splitserve.bench.tokenizer import ApproxTokenizer


def _client(srv, **kw):
    return OpenAIClient(srv.base_url, model="fake-model", **kw)


async def test_metrics_and_goodput_exact_against_scripted_server(fake_server):
    # Three kinds of request, 4 of each, 5 output tokens:
    #   fast:      TTFT 20 ms,  ITL 10 ms -> TPOT 10, E2E 60   (meets both SLOs)
    #   slow TTFT: TTFT 300 ms, ITL 10 ms -> TPOT 10, E2E 340  (misses TTFT <= 150)
    #   slow TPOT: TTFT 20 ms,  ITL 60 ms -> TPOT 60, E2E 260  (misses TPOT <= 30)
    kinds = [Script(ttft_s=0.02, itl_s=0.01), Script(ttft_s=0.30, itl_s=0.01), Script(ttft_s=0.02, itl_s=0.06)]
    srv = await fake_server(lambda i, body: kinds[i % 3])
    specs = wl.synthetic(input_len=8, output_len=5, num_requests=12)
    async with _client(srv) as c:
        out = await run_load(c, specs, concurrency=3)
    s = summarize(out.records, duration_s=out.duration_s, slo_ttft_ms=150.0, slo_tpot_ms=30.0)
    assert (s.completed, s.failed) == (12, 0)
    assert s.goodput.count == 4
    assert s.goodput.fraction == pytest.approx(4 / 12)
    assert s.goodput.requests_per_s == pytest.approx(4 / out.duration_s)
    assert s.total_output_tokens == 60
    slack = 25.0  # transport and scheduling on a shared machine
    assert 20.0 <= s.ttft_ms.p50 < 20.0 + slack  # 8 of 12 TTFTs are 20 ms
    assert 300.0 <= s.ttft_ms.max < 300.0 + slack
    assert s.ttft_ms.mean == pytest.approx((8 * 20 + 4 * 300) / 12, abs=slack)
    assert s.tpot_ms.mean == pytest.approx((8 * 10 + 4 * 60) / 12, abs=3.0)
    assert s.tpot_ms.max == pytest.approx(60.0, abs=3.0)
    assert s.itl_ms.count == 48
    assert s.itl_ms.mean == pytest.approx((32 * 10 + 16 * 60) / 48, abs=3.0)
    assert s.e2e_ms.max == pytest.approx(340.0, abs=slack)
    assert s.errors == {}


async def test_open_loop_constant_rate(fake_server):
    srv = await fake_server(Script())
    specs = wl.synthetic(input_len=4, output_len=2, num_requests=6, arrival=wl.Arrival(20.0, "constant"))
    async with _client(srv) as c:
        out = await run_load(c, specs)
    starts = [r.start_s for r in out.records]
    for i, t in enumerate(starts):
        assert t == pytest.approx(0.05 * i, abs=0.015)


async def test_concurrency_limit_holds(fake_server):
    srv = await fake_server(Script(ttft_s=0.03, itl_s=0.005))
    async with _client(srv) as c:
        out = await run_load(c, wl.synthetic(input_len=4, output_len=3, num_requests=12), concurrency=3)
    assert all(r.ok for r in out.records) and len(out.records) == 12
    assert srv.max_active == 3


async def test_rate_inf_sends_everything_at_once(fake_server):
    srv = await fake_server(Script(ttft_s=0.1))
    async with _client(srv) as c:
        out = await run_load(c, wl.synthetic(input_len=4, output_len=2, num_requests=10, arrival=wl.Arrival(float("inf"))))
    assert srv.max_active == 10
    assert max(r.start_s for r in out.records) < 0.08


async def test_duration_stops_new_requests(fake_server):
    srv = await fake_server(Script(ttft_s=0.05, itl_s=0.01))  # ~80 ms per request
    async with _client(srv) as c:
        out = await run_load(c, wl.synthetic(input_len=4, output_len=4, duration_s=0.4), concurrency=2, duration_s=0.4)
    assert 4 <= len(out.records) <= 12
    assert all(r.ok for r in out.records)
    assert max(r.start_s for r in out.records) < 0.4


async def test_agent_chains_feed_answers_forward(fake_server):
    srv = await fake_server(Script(ttft_s=0.02, itl_s=0.005))
    srv.token_text = " ans"
    text = wl.TextSource(ApproxTokenizer(), "one two three four five six " * 50)
    specs = wl.agent_chains(num_chains=2, steps=3, tool_tokens=6, answer_tokens=4, system_len=5, text=text)
    async with _client(srv) as c:
        out = await run_load(c, specs, concurrency=2)
    recs = out.records
    assert len(recs) == 6 and all(r.ok for r in recs)
    sizes = sorted(len(b["messages"]) for b in srv.bodies)
    assert sizes == [2, 2, 4, 4, 6, 6]  # system + user, then + assistant + user per step
    for b in srv.bodies:
        msgs = b["messages"]
        assert msgs[0]["role"] == "system"
        assert [m["content"] for m in msgs if m["role"] == "assistant"] == [" ans" * 4] * ((len(msgs) - 2) // 2)
    for chain in (0, 1):
        steps = sorted((r for r in recs if r.chain_id == chain), key=lambda r: r.step)
        for a, b in zip(steps, steps[1:]):  # sequential: a step starts after the previous ended
            assert b.start_s >= a.start_s + a.e2e_ms / 1000.0 - 1e-6
    s = summarize(recs)
    assert (s.num_chains, s.completed_chains) == (2, 2)
    assert s.chain_ms.mean == pytest.approx(3 * (20 + 3 * 5), abs=40.0)


async def test_agent_chain_stops_at_failed_step(fake_server):
    srv = await fake_server(lambda i, body: Script(status=503) if len(body["messages"]) == 3 else Script())
    async with _client(srv) as c:
        out = await run_load(c, wl.agent_chains(num_chains=1, steps=4, tool_tokens=3, answer_tokens=2), concurrency=1)
    assert [(r.step, r.ok, r.error) for r in out.records] == [(0, True, None), (1, False, "http_503")]
    s = summarize(out.records)
    assert (s.num_chains, s.completed_chains, s.errors) == (1, 0, {"http_503": 1})


async def test_agent_chain_on_completions_endpoint(fake_server):
    srv = await fake_server(Script())
    srv.token_text = " zz"
    async with _client(srv, endpoint="completions") as c:
        out = await run_load(c, wl.agent_chains(num_chains=1, steps=2, tool_tokens=3, answer_tokens=2), concurrency=1)
    assert all(r.ok for r in out.records)
    assert " zz zz" in srv.bodies[1]["prompt"] and isinstance(srv.bodies[0]["prompt"], str)


async def test_stop_cancels_in_flight_and_returns_partial(fake_server):
    srv = await fake_server(lambda i, body: Script(hang=True) if i >= 2 else Script())
    stop = asyncio.Event()
    counters = LiveCounters()
    async with _client(srv) as c:
        asyncio.get_running_loop().call_later(0.3, stop.set)
        out = await run_load(c, wl.synthetic(input_len=4, output_len=2, num_requests=50), concurrency=4,
                             stop=stop, counters=counters)
    assert out.interrupted
    kinds = [r.error for r in out.records]
    assert kinds.count(None) == 2 and kinds.count("cancelled") == 4
    s = summarize(out.records, interrupted=True)
    assert s.interrupted and s.errors == {"cancelled": 4}
    assert counters.completed == 2


async def test_workload_bug_surfaces(fake_server):
    srv = await fake_server(Script())

    def bad():
        yield from wl.synthetic(input_len=4, output_len=2, num_requests=1)
        raise RuntimeError("broken workload")

    async with _client(srv) as c:
        with pytest.raises(RuntimeError, match="broken workload"):
            await run_load(c, bad(), concurrency=1)
