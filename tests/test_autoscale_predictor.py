"""The autoscaler's predictor (the simulator in process) and its calibration from measured step times."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from splitserve.cluster.autoscale_predictor import (Bounds, MeasuredStepCost, Predictor, PredictorConfig,
                                                   calibrated_costs)
from splitserve.cluster.load_monitor import LoadMeasurement, StepTimes
from splitserve.sim.calibration import load_calibration
from splitserve.sim.simulator import SimConfig

_rng = random.Random(11)
PROMPTS = tuple(_rng.randint(50, 300) for _ in range(40))
OUTPUTS = tuple(_rng.randint(16, 48) for _ in range(40))
SHAPE = load_calibration()


def predictor(ttft=400.0, tpot=40.0, n=48) -> Predictor:
    sim = SimConfig(max_num_seqs=32, max_num_batched_tokens=256, max_model_len=1024, record_itl=False)
    return Predictor(PredictorConfig(ttft, tpot, num_requests=n, trust_shape=True), sim, {"prefill": 1000, "decode": 1000},
                     SHAPE.for_role("both") if SHAPE else None)


def load(rate: float, steps=None) -> LoadMeasurement:
    return LoadMeasurement(20.0, rate, int(rate * 20), PROMPTS, OUTPUTS, 0.0, None, None, steps or {})


def test_smallest_size_meeting_the_slo_matches_brute_force_on_a_grid():
    bounds = Bounds(1, 3, 1, 3)
    for rate in (0.5, 3.0, 8.0, 20.0):
        pr = predictor()
        m = load(rate)
        every = {(p, d): pr.evaluate(p, d, m) for p in range(1, 4) for d in range(1, 4)}
        meeting = [s for s, x in every.items() if x.meets]
        choice = predictor().choose(m, bounds, (1, 1))
        if not meeting:
            assert choice.target == (3, 3) and "no size" in choice.note
            continue
        smallest = min(sum(s) for s in meeting)
        assert sum(choice.target) == smallest, (rate, choice.target, meeting)
        assert choice.chosen.meets and choice.chosen == every[choice.target]
        # among the sizes of that total, the one with the most slack
        best = min((every[s] for s in meeting if sum(s) == smallest), key=lambda x: x.slack(pr.cfg))
        assert choice.target == (best.prefill, best.decode)


def test_monotone_in_load():
    bounds = Bounds(1, 4, 1, 4)
    pr = predictor()
    totals, ttfts = [], []
    for rate in (0.25, 0.5, 1, 2, 4, 6, 8, 12, 16, 24):
        c = pr.choose(load(rate), bounds, (1, 1))
        totals.append(sum(c.target))
        ttfts.append(c.current.ttft_ms)
    assert totals == sorted(totals), totals
    assert totals[0] == 2 and totals[-1] > 2
    # one size's predicted TTFT grows with the rate (to float noise: an idle system's is the same)
    assert all(b >= a - 1e-6 for a, b in zip(ttfts, ttfts[1:])), ttfts
    assert ttfts[-1] > 2 * ttfts[0]


def test_measured_step_times_rescale_the_cost_model():
    """Steps measured twice as slow as the model predicts make the simulator's steps twice as slow,
    and a predictor fed them wants more workers for the same load."""
    base = MeasuredStepCost(SHAPE)
    ctx = (sum(PROMPTS) / len(PROMPTS)) + (sum(OUTPUTS) / len(OUTPUTS)) / 2
    b, t = 8, 128
    kv = b * (ctx + 1)
    slow = {"decode": StepTimes(100, 100, 2 * base.time(b, b, kv, kv, b), b, 0, 0.0, 0.0, 0.5),
            "prefill": StepTimes(50, 0, 0.0, 0.0, 50, 2 * base.time(t, 1, t * (t + 1) / 2, t, 1, 1), t, 0.5)}
    costs = calibrated_costs(SHAPE, slow, ctx)
    assert costs["decode"].decode_scale == pytest.approx(2.0, rel=0.02)
    assert costs["prefill"].prefill_scale == pytest.approx(2.0, rel=0.02)
    assert costs["prefill"].decode_scale == pytest.approx(2.0, rel=0.02)  # borrowed from the decode pool
    assert costs["decode"].loop_s == 0.0
    # the worker loop's measured time around each step is charged on top of the step
    looped = {r: replace(st, overhead_s=0.004) for r, st in slow.items()}
    lc = calibrated_costs(SHAPE, looped, ctx)["decode"]
    assert lc.time(b, b, kv, kv, b) == pytest.approx(costs["decode"].time(b, b, kv, kv, b) + 0.004)
    assert lc.decode_scale == costs["decode"].decode_scale  # the step itself is rescaled as before
    bounds = Bounds(1, 4, 1, 4)
    fast_pick = predictor().choose(load(6.0), bounds, (1, 1))
    slow_pick = predictor().choose(load(6.0, slow), bounds, (1, 1))
    assert slow_pick.current.ttft_ms > fast_pick.current.ttft_ms
    assert sum(slow_pick.target) >= sum(fast_pick.target)


def test_a_measuring_accident_is_clamped_and_too_few_steps_change_nothing():
    few = {"decode": StepTimes(3, 3, 10.0, 1.0, 0, 0.0, 0.0, 0.1)}
    assert calibrated_costs(SHAPE, few, 100.0)["decode"].decode_scale == 1.0
    absurd = {"decode": StepTimes(100, 100, 1e6, 1.0, 0, 0.0, 0.0, 1.0)}
    assert calibrated_costs(SHAPE, absurd, 100.0)["decode"].decode_scale == 50.0


def test_nothing_to_size_by_without_finished_requests_and_runs_are_cached_and_budgeted():
    pr = predictor()
    empty = LoadMeasurement(20.0, 1.0, 20, (), (), 0.0, None, None, {})
    c = pr.choose(empty, Bounds(1, 2, 1, 2), (1, 1))
    assert c.target is None and pr.runs == 0
    c1 = pr.choose(load(3.0), Bounds(1, 2, 1, 2), (1, 1))
    runs = pr.runs
    c2 = pr.choose(load(3.0 * 1.001), Bounds(1, 2, 1, 2), (1, 1))  # rounds to the same key
    assert pr.runs == runs and c2.evaluated == 0 and c2.target == c1.target
    clock = iter(range(0, 10_000, 10))  # every reading 10 s later: the first total exhausts the budget
    slow = Predictor(pr.cfg, pr.sim_config, pr.num_blocks, pr.shape, clock=lambda: next(clock))
    c3 = slow.choose(load(40.0), Bounds(1, 4, 1, 4), (1, 1))
    assert "budget" in c3.note and c3.target == (4, 4)


def test_failed_simulated_requests_miss_the_slo():
    pr = predictor()
    huge = LoadMeasurement(20.0, 1.0, 20, (5000,), (10,), 0.0, None, None, {})  # longer than max_model_len
    x = pr.evaluate(1, 1, huge)
    assert not x.meets and math.isinf(x.ttft_ms)


def test_the_server_predicts_nothing_before_the_workers_measured_their_steps():
    """The calibration's absolute step times are another model's: a server predicts from measured ones only."""
    pr = predictor()
    live = Predictor(replace(pr.cfg, trust_shape=False), pr.sim_config, pr.num_blocks, pr.shape)
    c = live.choose(load(3.0), Bounds(1, 2, 1, 2), (1, 1))
    assert c.target is None and "not measured yet" in c.note and live.runs == 0
    steps = {"decode": StepTimes(50, 50, 0.01, 2.0, 0, 0.0, 0.0, 0.2),
             "prefill": StepTimes(20, 0, 0.0, 0.0, 20, 0.05, 150.0, 0.2)}
    c = live.choose(load(3.0, steps), Bounds(1, 2, 1, 2), (1, 1))
    assert c.target is not None and live.runs > 0


def test_seats_held_until_the_next_load_report_raise_the_predicted_ttft_of_a_seat_bound_pool():
    """With 2 seats per decode worker and fast steps, the report lag is a large share of each
    request's seat time: the predictor that models it predicts a longer TTFT, and wants more decode."""
    sim = SimConfig(max_num_seqs=2, max_num_batched_tokens=256, max_model_len=1024, record_itl=False)
    steps = {"decode": StepTimes(500, 500, 0.0015, 2.0, 0, 0.0, 0.0, 0.5, overhead_s=0.0005),
             "prefill": StepTimes(100, 0, 0.0, 0.0, 100, 0.02, 150.0, 0.3)}
    m = load(5.0, steps)
    plain = Predictor(PredictorConfig(1000.0, 50.0, num_requests=48), sim, {"prefill": 1000, "decode": 1000}, SHAPE)
    lagged = Predictor(replace(plain.cfg, report_interval_s=0.25), sim, plain.num_blocks, SHAPE)
    a, b = plain.evaluate(1, 1, m), lagged.evaluate(1, 1, m)
    assert b.ttft_ms > 1.5 * a.ttft_ms, (a, b)
    assert b.tpot_ms == pytest.approx(a.tpot_ms, rel=0.3)  # per-token time is not what changes
    bounds = Bounds(1, 2, 1, 3)
    assert lagged.choose(m, bounds, (1, 1)).target[1] >= plain.choose(m, bounds, (1, 1)).target[1]
