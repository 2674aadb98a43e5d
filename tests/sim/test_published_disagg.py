"""Published disaggregation results reproduced on their own testbeds (splitserve/sim/repro.py holds
the setups and their sources): the direction and the rough size, each with its tolerance.

`python benchmarks/sim_published_disagg.py` prints the same figures and the commands behind them.
"""

from __future__ import annotations

import pytest

from splitserve.sim import repro
from splitserve.sim.families import get_family


def within(got: float, published: float, factor: float) -> bool:
    return published / factor <= got <= published * factor


def test_distserve_terms_come_from_the_single_phase_rates_only():
    """The `ampere/distserve` terms reproduce the two figures they were fitted to (DistServe Figure 1:
    prefill-only 5.6 req/s, decode-only 10 req/s) within the bisection's resolution, and sit far
    below TensorRT-LLM's on the same A100 (the testbed's engine of 2023-24, not a fitted fudge)."""
    pre = repro.capacity(repro.DISTSERVE["prefill_only"], 0.25, 64)
    dec = repro.capacity(repro.DISTSERVE["decode_only"], 0.25, 64)
    assert within(pre, repro.DISTSERVE_PUBLISHED["prefill_only"], 1.1)
    assert within(dec, repro.DISTSERVE_PUBLISHED["decode_only"], 1.1)
    ours, trt = get_family("ampere", "distserve"), get_family("ampere", "trtllm")
    assert ours.eff_compute < 0.7 * trt.eff_compute and ours.eff_mem < 0.7 * trt.eff_mem


def test_distserve_figure1_disaggregation_doubles_the_per_gpu_rate():
    """DistServe (OSDI 2024) Figure 1, never fitted: colocated 1.6 req/s on one A100; two prefill
    instances + one decode instance 10 req/s on three, 3.3 per GPU, 2.1x. Tolerances: each rate
    within 1.5x, the per-GPU gain between 1.4x and 3x (simulated 2026-12-07: 1.92, 3.31, 1.72x)."""
    colocated = repro.capacity(repro.DISTSERVE["colocated"], 0.25, 64)
    per_gpu = repro.capacity(repro.DISTSERVE["2p1d"], 0.25, 64) / 3
    assert within(colocated, repro.DISTSERVE_PUBLISHED["colocated"], 1.5)
    assert within(per_gpu, repro.DISTSERVE_PUBLISHED["2p1d_per_gpu"], 1.5)
    assert 1.4 <= per_gpu / colocated <= 3.0


def test_distserve_gain_needs_the_testbed_stack():
    """The same comparison with TensorRT-LLM's A100 terms: steps 2-3x faster make the SLOs loose
    and interference cheap, and the per-GPU gain shrinks to under 1.3x. (What a published
    disaggregation gain depends on: the stack's speed relative to the SLOs.)"""
    fast = {k: [a for a in v if a not in ("--stack", "distserve")] for k, v in repro.DISTSERVE.items()}
    colocated = repro.capacity(fast["colocated"], 0.25, 64)
    per_gpu = repro.capacity(fast["2p1d"], 0.25, 64) / 3
    assert colocated > 3 * repro.DISTSERVE_PUBLISHED["colocated"]
    assert per_gpu / colocated < 1.3


def test_splitwise_ha_more_throughput_per_dollar_than_baseline_h100():
    """Splitwise (ISCA 2024): up to 1.4x throughput at 20% lower cost (1.75x per dollar), prompts on
    H100s and tokens on A100s (Splitwise-HA), against H100s serving both (Baseline-H100); the coding
    trace, Llama-2-70B, TPOT <= 50 ms. Tolerance: throughput per dollar at the SLOs 1.1x-2.5x,
    throughput at least 0.9x the baseline's; Splitwise-HH (all H100, same cost) at least the
    baseline's throughput (simulated 2026-12-07 12:10 UTC: HA 1.26x per dollar, 1.10x throughput; HH 1.18x).
    With TPOT <= 100 ms the baseline batches deeper and the gain shrinks to 1.11x per dollar."""
    cap = {k: repro.capacity(v, 2, 128) for k, v in repro.SPLITWISE.items()}
    usd = {k: repro.usd_per_hour(v) for k, v in repro.SPLITWISE.items()}
    base = cap["baseline-h100"] / usd["baseline-h100"]
    assert usd["splitwise-ha"] < usd["baseline-h100"] == usd["splitwise-hh"]
    assert 1.1 <= (cap["splitwise-ha"] / usd["splitwise-ha"]) / base <= 2.5
    assert cap["splitwise-ha"] >= 0.9 * cap["baseline-h100"]
    assert cap["splitwise-hh"] >= cap["baseline-h100"]


def test_mooncake_long_prompts_disaggregation_serves_more_within_tbt():
    """Mooncake (FAST 2025): on Kimi's long-prompt workload the disaggregated design handles 75% more
    requests than colocated vLLM within the TTFT and TBT SLOs (1.75x). Reproduced with TBT read as
    each request's mean gap (TPOT <= 100 ms): 1.2x-3x (simulated 2026-12-07: 1.71 vs 3.96 req/s,
    2.3x). Read as each request's longest gap (<= 200 ms) the colocated whole-prompt steps
    (0.5-1 s each) fail it at any load: disaggregated at least 1.5x and at least 1 req/s
    (simulated: 0 vs 3.27)."""
    tpot_colocated = repro.capacity(repro.MOONCAKE["colocated-tpot"], 0.25, 8)
    tpot_disaggregated = repro.capacity(repro.MOONCAKE["disaggregated-tpot"], 0.25, 8)
    assert tpot_colocated > 0 and 1.2 <= tpot_disaggregated / tpot_colocated <= 3.0
    colocated = repro.capacity(repro.MOONCAKE["colocated"], 0.25, 8)
    disaggregated = repro.capacity(repro.MOONCAKE["disaggregated"], 0.25, 8)
    assert disaggregated >= max(1.5 * colocated, 1.0)


@pytest.mark.parametrize("setup", ["distserve", "splitwise", "mooncake"])
def test_published_setups_are_valid_simulate_commands(setup):
    """Every setup parses as a `splitserve simulate` command and runs a few requests to completion."""
    runs = {"distserve": repro.DISTSERVE, "splitwise": repro.SPLITWISE, "mooncake": repro.MOONCAKE}[setup]
    for argv in runs.values():
        summary, _ = repro.simulate(argv, 0.5, 4)
        assert summary.completed == 4 and summary.failed == 0
