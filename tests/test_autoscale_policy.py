"""The autoscaler's policy on a fake clock, with the real in-process predictor (the simulator).

A scripted load (measurements at a given rate, one per interval) drives `Autoscaler.decide` and a
fake set of pools that brings a requested size up one interval later (or refuses it)."""

from __future__ import annotations

import asyncio
import random

import pytest

from splitserve.cluster.autoscale_loop import Autoscaler
from splitserve.cluster.autoscale_policy import Action, AutoscalePolicy, PolicyConfig, PolicyState
from splitserve.cluster.autoscale_predictor import Bounds, Predictor, PredictorConfig
from splitserve.cluster.load_monitor import LoadMeasurement
from splitserve.sim.calibration import load_calibration
from splitserve.sim.simulator import SimConfig

INTERVAL = 5.0
SLO_TTFT, SLO_TPOT = 500.0, 60.0
_rng = random.Random(7)
PROMPTS = tuple(_rng.randint(100, 400) for _ in range(60))
OUTPUTS = tuple(_rng.randint(20, 64) for _ in range(60))


def measurement(rate: float, ttft: float | None = None, tpot: float | None = None) -> LoadMeasurement:
    return LoadMeasurement(30.0, rate, int(rate * 30), PROMPTS, OUTPUTS, 0.1, ttft, tpot, {}, num_finished=len(PROMPTS))


class ScriptedMonitor:
    """Stands for the LoadMonitor: the test sets the next measurement."""

    def __init__(self) -> None:
        self.next = measurement(0.5)

    def observe_workers(self, workers) -> None:
        pass

    def measure(self) -> LoadMeasurement:
        return self.next


class FakePools:
    """A requested size is ready at the next interval; with `refuse` set, growth is refused."""

    def __init__(self, prefill: int = 1, decode: int = 1) -> None:
        self.ready = (prefill, decode)
        self.pending: tuple[int, int] | None = None
        self.refuse: str | None = None
        self.requests: list[tuple[float, tuple[int, int]]] = []
        self.now = 0.0

    def ready_sizes(self) -> tuple[int, int]:
        return self.ready

    def worker_stats(self):
        return []

    async def request_sizes(self, prefill: int, decode: int) -> str | None:
        self.requests.append((self.now, (prefill, decode)))
        grows = prefill > self.ready[0] or decode > self.ready[1]
        if self.refuse and grows:
            return self.refuse
        self.pending = (prefill, decode)
        return None

    def tick(self) -> None:
        if self.pending is not None:
            self.ready, self.pending = self.pending, None


def predictor() -> Predictor:
    cal = load_calibration()
    sim = SimConfig(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=2048, record_itl=False)
    return Predictor(PredictorConfig(SLO_TTFT, SLO_TPOT, num_requests=64, trust_shape=True), sim, {"prefill": 2000, "decode": 2000},
                     cal.for_role("both") if cal else None)


def scaler(bounds=Bounds(1, 4, 1, 4), pools: FakePools | None = None, **kw) -> tuple[Autoscaler, ScriptedMonitor, FakePools]:
    mon, pools = ScriptedMonitor(), pools or FakePools()
    cfg = PolicyConfig(SLO_TTFT, SLO_TPOT, bounds, interval_s=INTERVAL, cooldown_s=30.0, miss_grace_s=30.0, **kw)
    return Autoscaler(mon, predictor(), AutoscalePolicy(cfg), pools), mon, pools


def run_intervals(a: Autoscaler, mon: ScriptedMonitor, pools: FakePools, rates, start: int = 0, **obs):
    """One decision per interval at each rate; returns the decisions and the ready sizes after each."""
    out = []
    for i, rate in enumerate(rates, start):
        now = i * INTERVAL
        pools.now = now
        pools.tick()
        mon.next = measurement(rate, **obs)
        d = asyncio.run(a.apply(a.decide(now), now))
        out.append((d, pools.ready))
    pools.tick()
    return out


def test_rate_step_converges_to_the_simulators_target_within_4_intervals_up_and_24_down():
    a, mon, pools = scaler()
    low, high = 0.5, 12.0
    want_low = a.predictor.choose(measurement(low), a.policy.cfg.bounds, (1, 1)).target
    want_high = a.predictor.choose(measurement(high), a.policy.cfg.bounds, (1, 1)).target
    assert want_low == (1, 1) and sum(want_high) > 2, (want_low, want_high)  # the step matters

    run_intervals(a, mon, pools, [low] * 5)
    assert pools.ready == want_low
    up = run_intervals(a, mon, pools, [high] * 10, start=5)
    first = next(i for i, (_, ready) in enumerate(up) if ready == want_high)
    assert first <= 4, [(d.action, ready) for d, ready in up]
    assert all(ready == want_high for _, ready in up[first:])  # and stays there
    assert any("wanted" in r for d, _ in up for r in d.reasons)

    down = run_intervals(a, mon, pools, [low] * 40, start=15)
    first = next(i for i, (_, ready) in enumerate(down) if ready == want_low)
    assert first <= 24, [(d.action, ready) for d, ready in down]
    sizes = [ready for _, ready in down]
    assert all(x >= y for x, y in zip([s[0] for s in sizes], [s[0] for s in sizes[1:]]))  # only ever down
    # shrinking goes one worker per decision, never in the first intervals (sustained slack + cooldown)
    assert all(sum(x) - sum(y) <= 1 for x, y in zip(sizes, sizes[1:]))
    assert sizes[1] == want_high  # the first interval of slack changes nothing


def test_no_flapping_under_noise_at_a_boundary():
    a, mon, pools = scaler()
    bounds = a.policy.cfg.bounds
    # find a rate where the predictor's size flips between neighbours under +-20% noise
    lo = a.predictor.choose(measurement(1.6), bounds, (1, 1)).target
    hi = a.predictor.choose(measurement(2.6), bounds, (1, 1)).target
    assert lo != hi, (lo, hi)
    rng = random.Random(3)
    rates = [2.1 * (1 + rng.uniform(-0.2, 0.2)) for _ in range(80)]
    wanted = {a.predictor.choose(measurement(r), bounds, (1, 1)).target for r in rates}
    assert len(wanted) >= 2  # the noise does cross the boundary
    out = run_intervals(a, mon, pools, rates)
    changes = [d for d, _ in out if d.action is not Action.HOLD]
    assert len(changes) <= 1, [(d.action, d.target, d.reasons) for d in changes]  # at most one step up, then still


def test_bounds_respected_at_any_load():
    a, mon, pools = scaler(bounds=Bounds(1, 2, 1, 2))
    out = run_intervals(a, mon, pools, [0.2] * 3 + [40.0] * 12 + [0.1] * 30)
    for d, ready in out:
        assert 1 <= d.target[0] <= 2 and 1 <= d.target[1] <= 2
        assert 1 <= ready[0] <= 2 and 1 <= ready[1] <= 2
    assert any(d.target == (2, 2) or d.target[0] == 2 for d, _ in out)  # it did grow to the bound
    assert any("no size within the bounds" in r for d, _ in out for r in d.reasons)
    assert out[-1][1] == (1, 1)  # and came back to the minimum


def test_min_bounds_hold_when_idle():
    a, mon, pools = scaler(bounds=Bounds(2, 3, 2, 3), pools=FakePools(2, 2))
    out = run_intervals(a, mon, pools, [0.05] * 20)
    assert all(ready == (2, 2) for _, ready in out)


def test_refused_resources_are_reported_and_retried_with_backoff():
    pools = FakePools()
    pools.refuse = "no node has {'prefill': 1} free; asked Ray's autoscaler for 2 more"
    a, mon, pools = scaler(pools=pools, backoff_s=10.0, backoff_max_s=40.0)
    out = run_intervals(a, mon, pools, [12.0] * 60)  # 300 s of a load it cannot grow for
    assert pools.ready == (1, 1)
    refusals = [d for d, _ in out if d.state is PolicyState.WAITING_CAPACITY]
    assert refusals and all(d.retry_at is not None for d in refusals)
    assert any("resources refused" in r and "asked Ray" in r for d in refusals for r in d.reasons)
    times = [t for t, _ in pools.requests]
    gaps = [b - a_ for a_, b in zip(times, times[1:])]
    # not a tight loop: at most one try per backoff; waits grow 10 -> 20 -> 40 and stay capped
    assert len(times) <= 10, times
    assert all(g >= 10.0 for g in gaps), gaps
    assert max(gaps) >= 40.0
    # when resources appear, the next try succeeds and the backoff starts over
    pools.refuse = None
    out = run_intervals(a, mon, pools, [12.0] * 12, start=60)
    assert sum(pools.ready) > 2
    assert a.policy.backoff == 0.0 and a.policy.state is PolicyState.STEADY


def test_a_refused_target_is_withdrawn_when_the_need_passes():
    pools = FakePools()
    pools.refuse = "no resources"
    a, mon, pools = scaler(pools=pools, backoff_s=10.0)
    run_intervals(a, mon, pools, [12.0] * 2)
    assert a.policy.state is PolicyState.WAITING_CAPACITY and a.policy.target != (1, 1)
    out = run_intervals(a, mon, pools, [0.3] * 4, start=2)  # the load went away before the resources came
    back = [d for d, _ in out if d.action is Action.SCALE_DOWN]
    assert back and back[0].target == (1, 1) and any("no longer waiting" in r for r in back[0].reasons)
    assert pools.requests[-1][1] == (1, 1)  # the pools were told: pending workers withdrawn
    assert a.policy.state is PolicyState.STEADY and a.policy.target == (1, 1)


def test_observed_miss_adds_a_worker_the_predictor_did_not_ask_for():
    a, mon, pools = scaler()
    out = run_intervals(a, mon, pools, [0.5] * 8)  # past the grace after start
    assert pools.ready == (1, 1)
    out = run_intervals(a, mon, pools, [0.5] * 2, start=8, tpot=SLO_TPOT * 2)
    assert pools.ready == (1, 2)
    assert any("observed TPOT" in r for d, _ in out for r in d.reasons)
    # the miss's size is a floor while the load it was missed at lasts, though the predictor says 1:1 is plenty
    out = run_intervals(a, mon, pools, [0.5 * 0.9] * 30, start=10)
    assert all(ready == (1, 2) for _, ready in out)
    assert any("decode could shrink to 1" in r for d, _ in out for r in d.reasons)
    # once the load falls clearly below it (and the hold time passed), the pool shrinks back
    out = run_intervals(a, mon, pools, [0.3] * 6, start=40)
    assert pools.ready == (1, 1)


def test_policy_config_rejects_nonsense():
    with pytest.raises(ValueError):
        PolicyConfig(0, 50, Bounds(1, 2, 1, 2))
    with pytest.raises(ValueError):
        Bounds(2, 1, 1, 1)
    with pytest.raises(ValueError):
        Bounds(0, 1, 1, 1)


def test_an_observed_ttft_miss_grows_the_pool_the_simulator_says_delays_first_tokens():
    """Requests wait for a decode seat before their prefill starts: with 2 seats per decode worker a
    TTFT miss is the decode pool's; with 64 seats and long prompts it is the prefill pool's."""
    cal = load_calibration()
    for seats, want in ((2, (1, 2)), (64, (2, 1))):
        sim = SimConfig(max_num_seqs=seats, max_num_batched_tokens=512, max_model_len=2048, record_itl=False)
        pred = Predictor(PredictorConfig(20_000.0, 1000.0, num_requests=64, trust_shape=True), sim,
                         {"prefill": 2000, "decode": 2000}, cal.for_role("both") if cal else None)
        cfg = PolicyConfig(20_000.0, 1000.0, Bounds(1, 3, 1, 3), interval_s=INTERVAL, miss_grace_s=0.0)
        pools = FakePools()
        a = Autoscaler(ScriptedMonitor(), pred, AutoscalePolicy(cfg), pools)
        out = run_intervals(a, a.monitor, pools, [3.0], ttft=30_000.0)  # observed far worse than predicted
        d = out[0][0]
        assert d.action is Action.SCALE_UP and d.target == want, (seats, d.target, d.reasons)
        assert any("observed TTFT" in r for r in d.reasons)


def test_one_pool_shrinks_per_decision():
    a, mon, pools = scaler(pools=FakePools(3, 3))
    out = run_intervals(a, mon, pools, [0.3] * 40)
    sizes = [ready for _, ready in out]
    assert sizes[-1] == (1, 1)
    assert all(sum(x) - sum(y) <= 1 for x, y in zip(sizes, sizes[1:]))


def test_a_worker_that_goes_silent_is_not_withdrawn_and_a_target_never_ready_is():
    a, mon, pools = scaler(settle_s=20.0)
    run_intervals(a, mon, pools, [12.0] * 3)
    grown = pools.ready
    assert sum(grown) > 2 and a.policy.state is PolicyState.STEADY
    pools.ready = (grown[0] - 1, grown[1])  # one worker silent (out of routing) for a while
    out = run_intervals(a, mon, pools, [12.0] * 3, start=3)
    assert all(d.action is not Action.SCALE_DOWN for d, _ in out), [d.reasons for d, _ in out]
    assert a.policy.target == grown
    # a target whose workers never become ready is given up after settle_s, and withdrawn once not needed
    a, mon, pools = scaler(settle_s=20.0)
    pools.request_sizes = _never_ready(pools)
    out = run_intervals(a, mon, pools, [12.0] * 8 + [0.3] * 8)
    assert any("not ready after 20 s" in r for d, _ in out for r in d.reasons)
    assert pools.requests[-1][1] == (1, 1) and a.policy.target == (1, 1)


def _never_ready(pools: FakePools):
    async def request_sizes(prefill: int, decode: int) -> str | None:
        pools.requests.append((pools.now, (prefill, decode)))
        return None  # accepted, but nothing ever starts
    return request_sizes


def test_when_the_simulator_cannot_tell_the_pools_apart_a_ttft_miss_grows_the_busier_one():
    from splitserve.cluster.autoscale_policy import Observation
    from splitserve.cluster.autoscale_predictor import Prediction, SizeChoice

    same = (Prediction(2, 1, 100.0, 5.0, True), Prediction(1, 2, 104.0, 5.0, True))
    for busy, want in (((0.9, 0.2), (2, 1)), ((0.2, 0.6), (1, 2))):
        cfg = PolicyConfig(SLO_TTFT, SLO_TPOT, Bounds(1, 3, 1, 3), miss_grace_s=0.0)
        choice = SizeChoice((1, 1), same[0], Prediction(1, 1, 120.0, 5.0, True), 0, 0.0, grow=same)
        d = AutoscalePolicy(cfg).step(Observation(0.0, (1, 1), choice, SLO_TTFT * 3, 5.0, 20, 3.0, busy))
        assert d.target == want, (busy, d.target, d.reasons)
