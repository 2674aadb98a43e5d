"""The event loop: determinism, completion, no leaks, disaggregation, chains, analytic timing."""

from __future__ import annotations

import json

import pytest

from splitserve.bench import workloads as wl
from splitserve.bench.metrics import summarize
from splitserve.cluster.router import RouterConfig
from splitserve.sim.cost import Deployment, FamilyParams, StepCost
from splitserve.sim.hardware import get_hardware, get_link
from splitserve.sim.models import get_model
from splitserve.sim.simulator import PoolSpec, RecordSink, SimConfig, Simulation

IDEAL = FamilyParams(1.0, 1.0, 0.0, 0.0, "pure roofline (test)")


def cost(hw="h100", model="llama-3.1-8b", dtype="bf16", family=None) -> StepCost:
    m = get_model(model)
    return StepCost(Deployment(get_hardware(hw), m, dtype, "bf16", family=family))


def pool(role="both", n=1, blocks=4000, c=None) -> PoolSpec:
    c = c or cost()
    return PoolSpec(role, n, blocks, c, kv_bytes_per_token=c.deployment.kv_bytes_per_token,
                    num_layers=c.deployment.model.num_layers)


def cfg(**kw) -> SimConfig:
    return SimConfig(max_model_len=kw.pop("max_model_len", 4096), check_integrity=kw.pop("check", True), **kw)


def run(pools, specs, link=None, concurrency=None, **kw):
    sim = Simulation(cfg(**kw), pools, link=link, concurrency=concurrency)
    sink = sim.run(specs)
    sim.check_idle()  # every scheduler empty, every block free, invariants hold
    return sim, sink


def poisson(n=200, rate=20.0, inp=256, out=32, seed=0):
    return wl.synthetic(input_len=wl.parse_length(f"uniform:{inp // 2}:{inp}"), output_len=out, num_requests=n,
                        arrival=wl.Arrival(rate), seed=seed)


def test_one_request_matches_the_cost_model_step_by_step():
    c = cost(family=IDEAL)
    spec = wl.RequestSpec(0, 300, 5, 0.0)
    sim, sink = run([pool(c=c)], [spec], max_num_batched_tokens=512)
    (rec,) = sink.records
    pairs = 300 * 301 // 2
    assert rec.ttft_ms == pytest.approx(c.time(300, 1, pairs, 300, 1) * 1e3, rel=1e-9)
    for k, gap in enumerate(rec.itl_ms):  # decode of token k+2: context 300 + k tokens cached
        assert gap == pytest.approx(c.decode_step(1, 300 + k) * 1e3, rel=1e-9)
    assert rec.output_tokens == 5 and rec.input_tokens == 300 and len(rec.itl_ms) == 4
    assert sim.num_steps == 5


def test_chunked_prefill_takes_several_steps():
    c = cost(family=IDEAL)
    sim, sink = run([pool(c=c)], [wl.RequestSpec(0, 1200, 2, 0.0)], max_num_batched_tokens=512)
    assert sim.num_steps == 3 + 1  # 512 + 512 + 176 prompt tokens, then one decode
    ttft = sum(c.time(n, int(s + n == 1200), n * s + n * (n + 1) // 2, s + n, 1)
               for s, n in ((0, 512), (512, 512), (1024, 176)))
    assert sink.records[0].ttft_ms == pytest.approx(ttft * 1e3, rel=1e-9)


def test_deterministic_under_a_seed_and_every_request_finishes():
    a = run([pool()], poisson(seed=3))[1].records
    b = run([pool()], poisson(seed=3))[1].records
    assert [(r.ttft_ms, r.e2e_ms, r.itl_ms) for r in a] == [(r.ttft_ms, r.e2e_ms, r.itl_ms) for r in b]
    assert len(a) == 200 and all(r.ok and r.output_tokens == 32 for r in a)
    c = run([pool()], poisson(seed=4))[1].records
    assert [r.ttft_ms for r in a] != [r.ttft_ms for r in c]


def test_preemption_under_a_small_kv_pool_still_finishes_everything():
    specs = wl.synthetic(input_len=200, output_len=200, num_requests=40, arrival=wl.Arrival(float("inf")))
    sim, sink = run([pool(blocks=300)], specs, max_model_len=1024)
    assert sum(w.sched.num_preemptions for w in sim.workers) > 0
    assert sink.builder.ok == 40 and all(r.output_tokens == 200 for r in sink.records)


def test_multi_replica_aggregated_uses_the_router():
    sim, sink = run([pool(n=4)], poisson(n=300, rate=100))
    assert sim.router is not None and sink.builder.ok == 300
    assert all(w.steps > 0 for w in sim.workers)


def test_disaggregated_prefill_decode_with_kv_transfer():
    c = cost()
    pools = [pool("prefill", 2, c=c), pool("decode", 2, c=c)]
    sim, sink = run(pools, poisson(n=150, rate=30), link=get_link("ib-ndr"))
    assert sink.builder.ok == 150
    pre = [w for w in sim.workers if w.role == "prefill"]
    dec = [w for w in sim.workers if w.role == "decode"]
    assert all(w.steps > 0 for w in pre + dec)
    # decode workers never prefill a prompt: every one of their chunks is a single token
    assert sum(w.tokens for w in pre) >= 150 * 128
    for r in sink.records:
        assert r.output_tokens == 32 and len(r.itl_ms) == 31


def test_kv_transfer_time_shows_in_the_first_gap():
    c = cost(family=IDEAL)
    slow = get_link("0.01")  # 10 MB/s: 300 tokens x 128 KiB = 39 MB take ~3.9 s
    sim, sink = run([pool("prefill", 1, c=c), pool("decode", 1, c=c)], [wl.RequestSpec(0, 300, 3, 0.0)],
                    link=slow)
    (rec,) = sink.records
    xfer = 300 * c.deployment.kv_bytes_per_token / slow.bandwidth
    assert rec.itl_ms[0] / 1e3 > xfer * 0.99  # TTFT does not wait for the transfer, token 2 does
    assert rec.ttft_ms < 100


def test_conditional_disaggregation_prefills_short_prompts_locally():
    c = cost()
    pools = [pool("prefill", 1, c=c), pool("decode", 1, c=c)]
    specs = wl.synthetic(input_len=wl.parse_length("uniform:16:64"), output_len=4, num_requests=30,
                         arrival=wl.Arrival(50.0))
    sim, sink = run(pools, specs, link=get_link("ib-ndr"), router=RouterConfig(local_prefill_threshold=100))
    assert sink.builder.ok == 30
    assert [w for w in sim.workers if w.role == "prefill"][0].steps == 0


def test_agent_chains_reuse_the_prefix_and_run_in_order():
    specs = wl.agent_chains(num_chains=3, steps=4, tool_tokens=64, answer_tokens=16, system_len=128)
    sim, sink = run([pool()], specs, concurrency=3)
    recs = sink.records
    assert len(recs) == 12 and all(r.ok for r in recs)
    s = summarize(recs)
    assert s.num_chains == 3 and s.completed_chains == 3
    by_chain = {}
    for r in recs:
        by_chain.setdefault(r.chain_id, []).append(r)
    for steps in by_chain.values():
        steps.sort(key=lambda r: r.step)
        for a, b in zip(steps, steps[1:]):
            assert b.start_s == pytest.approx(a.start_s + a.e2e_ms / 1e3)  # next step right after
            assert b.input_tokens == a.input_tokens + 16 + 64
    bm = sim.workers[0].bm
    assert bm.num_hit_tokens > 3 * 3 * 128  # later steps hit the conversation so far


def test_shared_prefix_hits_the_cache():
    specs = wl.shared_prefix(prefix_len=512, input_len=32, output_len=8, num_requests=50, arrival=wl.Arrival(20.0))
    sim, sink = run([pool()], specs)
    assert sink.builder.ok == 50
    assert sim.workers[0].bm.num_hit_tokens >= 49 * 512


def test_closed_loop_concurrency_bounds_requests_in_flight():
    specs = wl.synthetic(input_len=64, output_len=16, num_requests=40)
    sim, sink = run([pool()], specs, concurrency=4)
    recs = sorted(sink.records, key=lambda r: r.start_s)
    for r in recs:
        t = r.start_s
        inflight = sum(1 for x in recs if x.start_s <= t < x.start_s + x.e2e_ms / 1e3)
        assert inflight <= 4


def test_too_long_prompt_is_a_400_and_queue_overflow_a_503():
    specs = [wl.RequestSpec(0, 5000, 4, 0.0), wl.RequestSpec(1, 100, 4, 0.0)]
    sim, sink = run([pool()], specs)
    errs = {r.request_id: r.error for r in sink.records}
    assert errs == {0: "http_400", 1: None}
    specs = wl.synthetic(input_len=64, output_len=64, num_requests=50, arrival=wl.Arrival(float("inf")))
    sim, sink = run([pool()], specs, max_num_seqs=4, max_waiting=10)
    assert sink.builder.errors.get("http_503") == 50 - 14 and sink.builder.ok == 14


def test_streamed_records_bounded_memory(tmp_path):
    path = tmp_path / "recs.jsonl"
    sink = RecordSink(stream_path=str(path))
    sim = Simulation(cfg(check=False), [pool(n=2)], sink=sink)
    sim.run(poisson(n=100, rate=50))
    assert sink.records == [] and sink.builder.ok == 100 and len(sink.builder.ttft) == 100
    lines = path.read_text().splitlines()
    assert len(lines) == 100 and json.loads(lines[0])["ok"] is True
    assert sink.builder.itl.n == 100 * 31
    kept = run([pool(n=2)], poisson(n=100, rate=50))[1]
    exact = summarize(kept.records).itl_ms
    assert sink.builder.itl.quantile(50) == pytest.approx(exact.p50, rel=0.02)


def test_records_are_the_bench_schema(tmp_path):
    from splitserve.bench.schema import BenchResult, RunConfig, load_results, write_json

    _, sink = run([pool()], poisson(n=20))
    res = BenchResult(RunConfig(source="sim"), summarize(sink.records), sink.records)
    write_json(str(tmp_path / "r.json"), res)
    (back,) = load_results(str(tmp_path / "r.json"))
    assert back.config.source == "sim" and len(back.requests) == 20
    assert back.summary.tpot_ms.mean == pytest.approx(res.summary.tpot_ms.mean)


def test_scheduler_fast_paths_leave_simulated_results_unchanged(monkeypatch):
    """The simulator drives Scheduler.advance() and the decode lane; with the lane off and every
    token stop-checked (the general path) a run with chunked prefill, preemption, shared prefixes and
    routing gives bit-identical records."""
    from splitserve.engine.scheduler import Scheduler

    def go():
        specs = wl.shared_prefix(prefix_len=300, input_len=wl.parse_length("uniform:16:700"),
                                 output_len=wl.parse_length("uniform:1:90"), num_prefixes=2, num_requests=120,
                                 arrival=wl.Arrival(80.0), seed=2)
        sim, sink = run([pool(n=2, blocks=160)], specs, max_model_len=1024, block_size=8,
                        max_num_batched_tokens=256)
        sim.check_idle()
        return sum(w.sched.num_preemptions for w in sim.workers), [
            (r.request_id, r.ttft_ms, r.e2e_ms, r.itl_ms, r.output_tokens, r.ok) for r in sink.records]

    fast = go()
    monkeypatch.setattr(Scheduler, "decode_lane", False)
    monkeypatch.setattr(Scheduler, "_stop_check_len", lambda self, req: 0)
    general = go()
    assert fast[0] > 0  # preemption happened
    assert fast == general
