"""The autoscaler's predictor: the simulator, in process, asked for the smallest P:D meeting the SLOs.

It replays a short synthetic workload drawn from the measured load (Poisson arrivals at the
measured rate, prompt and output lengths resampled from the finished requests, the measured
prefix hit rate as a shared prefix) through `sim.simulator.Simulation` - the same scheduler,
router, admission and KV handoff the live gateway and workers run - once per candidate size. The
step-cost model is this machine's `local-cpu` calibration (its shape: how a step's time grows
with tokens, batch and context), scaled per role so that it reproduces the step times the workers
measured over the window (`MeasuredStepCost`). Each run is bounded (a fixed number of requests),
results are cached by a quantized key, and a whole search stops at a wall-time budget.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from splitserve.bench.workloads import RequestSpec
from splitserve.cluster.admission import AdmissionConfig
from splitserve.cluster.load_monitor import SLO_PERCENTILE, LoadMeasurement, StepTimes, percentile
from splitserve.cluster.router import RouterConfig
from splitserve.sim.calibration import Calibration, load_calibration
from splitserve.sim.hardware import Link
from splitserve.sim.simulator import PoolSpec, RecordSink, SimConfig, Simulation

MIN_STEPS = 5  # steps of a kind a role must have run in the window before its time rescales the model
SCALE_BOUNDS = (0.02, 50.0)  # a measured/modelled ratio outside this is a measuring accident: clamped
SAME_HOST_LINK = Link("same-host", 10e9, 50e-6, "shared memory on one host (KV bytes not modelled)")
CACHE_SIZE = 512


@dataclass(frozen=True)
class Bounds:
    min_prefill: int
    max_prefill: int
    min_decode: int
    max_decode: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_prefill <= self.max_prefill:
            raise ValueError("need 1 <= --min-prefill <= --max-prefill")
        if not 1 <= self.min_decode <= self.max_decode:
            raise ValueError("need 1 <= --min-decode <= --max-decode")

    def clamp(self, prefill: int, decode: int) -> tuple[int, int]:
        return (min(max(prefill, self.min_prefill), self.max_prefill),
                min(max(decode, self.min_decode), self.max_decode))

    def sizes(self) -> list[tuple[int, int]]:
        """Every size, smallest total first (then fewer decode workers)."""
        grid = [(p, d) for p in range(self.min_prefill, self.max_prefill + 1)
                for d in range(self.min_decode, self.max_decode + 1)]
        return sorted(grid, key=lambda s: (s[0] + s[1], s[1], s[0]))


@dataclass(frozen=True)
class PredictorConfig:
    slo_ttft_ms: float
    slo_tpot_ms: float
    num_requests: int = 64  # simulated requests per candidate (bounds each run)
    budget_s: float = 4.0  # wall time for one whole search
    shrink_headroom: float = 0.25  # a smaller size must meet the SLOs at this much more load
    # The live gateway sees a decode seat free only at the worker's next load report (this often):
    # each simulated request holds its seat half an interval longer, as extra decode steps. 0: off.
    report_interval_s: float = 0.0
    seed: int = 0
    # False (the server): no prediction before the workers measured decode and prefill steps - the
    # calibration's absolute times are another model's on another day. True: they are the truth (tests).
    trust_shape: bool = False


@dataclass(frozen=True)
class Prediction:
    prefill: int
    decode: int
    ttft_ms: float  # at the SLO percentile; inf when requests failed
    tpot_ms: float
    meets: bool

    def slack(self, cfg: PredictorConfig) -> float:
        """The larger of TTFT/SLO and TPOT/SLO: below 1 the SLOs hold."""
        return max(self.ttft_ms / cfg.slo_ttft_ms, self.tpot_ms / cfg.slo_tpot_ms)

    def to_json(self) -> dict:
        def num(x: float):
            return None if math.isinf(x) else round(x, 2)
        return {"prefill": self.prefill, "decode": self.decode, "ttft_ms": num(self.ttft_ms),
                "tpot_ms": num(self.tpot_ms), "meets_slo": self.meets}


@dataclass(frozen=True)
class SizeChoice:
    """The predictor's answer for one measurement."""

    target: tuple[int, int] | None  # None: nothing to go on (no request measured in the window)
    chosen: Prediction | None
    current: Prediction | None
    evaluated: int  # simulated runs (cache misses)
    wall_s: float
    note: str = ""
    # One worker fewer in a pool that the chosen size has smaller, at (1 + shrink_headroom) x the
    # measured rate: the policy shrinks a pool only if this still meets the SLOs.
    shrink: tuple[Prediction, ...] = ()
    # One worker more in each pool, at the measured rate: which pool an observed TTFT miss that
    # the prediction did not see should grow (asked for with `observed_miss`).
    grow: tuple[Prediction, ...] = ()


@dataclass(frozen=True)
class MeasuredStepCost:
    """The calibration's step time for `role`, scaled to the measured decode and prefill steps."""

    shape: Calibration | None = field(default=None, repr=False)  # None: no calibration (the fallback below)
    decode_scale: float = 1.0
    prefill_scale: float = 1.0
    loop_s: float = 0.0  # the worker loop's own time around each step (measured), added to each
    request_overhead_s: float = 0.0

    def step(self, T: int, S: int, A: int, K: int, B: int, P: int = 0) -> float:
        """The engine step alone (what the workers' step_seconds measure)."""
        base = self.shape.step_time(T, S, A, K, B, P) if self.shape is not None else 0.005 + 1e-5 * T + 5e-4 * B
        return base * (self.prefill_scale if P else self.decode_scale)

    def time(self, T: int, S: int, A: int, K: int, B: int, P: int = 0) -> float:
        return self.step(T, S, A, K, B, P) + self.loop_s


def _clamped(x: float) -> float:
    return min(max(x, SCALE_BOUNDS[0]), SCALE_BOUNDS[1])


def calibrated_costs(shape: Calibration | None, steps: dict[str, StepTimes], context: float,
                     ) -> dict[str, MeasuredStepCost]:
    """Per role, the model's step time rescaled to what the role's workers measured. A role with too
    few steps of a kind borrows the other role's factor for it (same host, same model)."""
    def model(T, S, A, K, B, P):
        return MeasuredStepCost(shape).step(T, S, A, K, B, P)

    decode, prefill = {}, {}
    for role, st in steps.items():
        if st.decode_steps >= MIN_STEPS and st.decode_batch > 0:
            b = st.decode_batch
            kv = b * (context + 1)
            decode[role] = _clamped(st.decode_step_s / model(round(b), round(b), kv, kv, round(b), 0))
        if st.prefill_steps >= MIN_STEPS and st.prefill_tokens_per_step > 1:
            t = st.prefill_tokens_per_step
            prefill[role] = _clamped(st.prefill_step_s / model(round(t), 1, t * (t + 1) / 2, t, 1, 1))
    loop = {role: st.overhead_s for role, st in steps.items() if st.overhead_s > 0}
    out = {}
    for role in ("prefill", "decode"):
        d = decode.get(role) or next(iter(decode.values()), 1.0)
        p = prefill.get(role) or next(iter(prefill.values()), d)
        out[role] = MeasuredStepCost(shape, d, p, loop.get(role) or next(iter(loop.values()), 0.0))
    return out


MAX_LAG_TOKENS = 1024  # bounds a simulated request's extra steps whatever the step time


def _report_lag_tokens(report_interval_s: float, decode: StepTimes | None) -> int:
    """Decode steps in half a load-report interval, at the decode pool's measured cycle time."""
    if report_interval_s <= 0 or decode is None or decode.decode_steps < MIN_STEPS:
        return 0
    cycle = decode.decode_step_s + decode.overhead_s
    return min(MAX_LAG_TOKENS, round(0.5 * report_interval_s / cycle)) if cycle > 0 else 0


def _measured(steps: dict[str, StepTimes]) -> bool:
    """Enough decode steps on the decode pool and prefill steps somewhere to rescale the cost model."""
    d = steps.get("decode")
    return (d is not None and d.decode_steps >= MIN_STEPS
            and any(st.prefill_steps >= MIN_STEPS and st.prefill_tokens_per_step > 1 for st in steps.values()))


def _sig(x: float, digits: int = 2) -> float:
    """`x` to `digits` significant digits: nearby measurements share a cache entry."""
    return float(f"{x:.{digits - 1}e}") if x else 0.0


class Predictor:
    def __init__(self, config: PredictorConfig, sim_config: SimConfig, num_blocks: dict[str, int],
                 shape: Calibration | None = None, clock=time.perf_counter) -> None:
        self.cfg = config
        self.sim_config = sim_config
        self.num_blocks = num_blocks
        self.shape = shape
        self.clock = clock
        self._cache: OrderedDict[tuple, Prediction] = OrderedDict()
        self.runs = 0

    @classmethod
    def for_local_cpu(cls, config: PredictorConfig, sim_config: SimConfig, num_blocks: dict[str, int]) -> "Predictor":
        cal = load_calibration()
        return cls(config, sim_config, num_blocks, cal.for_role("both") if cal is not None else None)

    # ---- one size -------------------------------------------------------------------------
    def _key(self, m: LoadMeasurement, costs: dict[str, MeasuredStepCost]) -> tuple:
        mean = (lambda xs: sum(xs) / len(xs))
        return (_sig(m.arrival_rate), _sig(mean(m.prompt_lens)), _sig(mean(m.output_lens)),
                round(m.prefix_hit_rate, 1),
                *(_sig(c.decode_scale) for c in costs.values()), *(_sig(c.prefill_scale) for c in costs.values()),
                *(_sig(c.loop_s) for c in costs.values()))

    def workload(self, m: LoadMeasurement) -> list[RequestSpec]:
        """`num_requests` Poisson arrivals at the measured rate; lengths resampled from the window.
        The same uniform draws at every rate, so a higher rate is the same requests, closer together."""
        rng = random.Random(f"splitserve-autoscale:{self.cfg.seed}")
        t, specs = 0.0, []
        held = _report_lag_tokens(self.cfg.report_interval_s, m.steps.get("decode"))
        for i in range(self.cfg.num_requests):
            t += -math.log(1.0 - rng.random()) / m.arrival_rate
            j = rng.randrange(len(m.prompt_lens))
            prompt, out = max(m.prompt_lens[j], 1), max(m.output_lens[j], 1) + held
            shared = min(int(m.prefix_hit_rate * prompt), prompt - 1)
            specs.append(RequestSpec(i, prompt, out, arrival_s=t, prefix_group=0 if shared else None,
                                     shared_prefix_len=shared))
        return specs

    def evaluate(self, prefill: int, decode: int, m: LoadMeasurement,
                 costs: dict[str, MeasuredStepCost] | None = None) -> Prediction:
        costs = costs or self.costs(m)
        key = (prefill, decode, *self._key(m, costs))
        got = self._cache.get(key)
        if got is not None:
            self._cache.move_to_end(key)
            return got
        pools = [PoolSpec("prefill", prefill, self.num_blocks["prefill"], costs["prefill"]),
                 PoolSpec("decode", decode, self.num_blocks["decode"], costs["decode"])]
        sink = RecordSink(slo_ttft_ms=self.cfg.slo_ttft_ms, slo_tpot_ms=self.cfg.slo_tpot_ms)
        Simulation(self.sim_config, pools, link=SAME_HOST_LINK, sink=sink).run(self.workload(m))
        self.runs += 1
        recs = sink.records
        failed = any(not r.ok for r in recs)
        ttft = math.inf if failed else percentile((r.ttft_ms for r in recs if r.ttft_ms is not None), SLO_PERCENTILE)
        tpot = math.inf if failed else percentile((r.tpot_ms for r in recs if r.tpot_ms is not None), SLO_PERCENTILE)
        ttft, tpot = ttft if ttft is not None else 0.0, tpot if tpot is not None else 0.0
        pred = Prediction(prefill, decode, ttft, tpot, ttft <= self.cfg.slo_ttft_ms and tpot <= self.cfg.slo_tpot_ms)
        self._cache[key] = pred
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return pred

    def costs(self, m: LoadMeasurement) -> dict[str, MeasuredStepCost]:
        prompt = sum(m.prompt_lens) / len(m.prompt_lens) if m.prompt_lens else 0.0
        out = sum(m.output_lens) / len(m.output_lens) if m.output_lens else 0.0
        return calibrated_costs(self.shape, m.steps, prompt + out / 2)

    # ---- the search -----------------------------------------------------------------------
    def choose(self, m: LoadMeasurement, bounds: Bounds, current: tuple[int, int],
               observed_miss: bool = False) -> SizeChoice:
        """The smallest size within `bounds` predicted to meet both SLOs (among equal totals, the
        one with the most slack); the largest size when none does, or when the budget runs out first.
        Also the predictions the policy's hysteresis needs: `shrink` and (with `observed_miss`) `grow`."""
        t0 = self.clock()
        runs0 = self.runs
        if not m.prompt_lens or m.arrival_rate <= 0:
            return SizeChoice(None, None, None, 0, 0.0, "no request measured in the window: nothing to size by")
        if not self.cfg.trust_shape and not _measured(m.steps):
            return SizeChoice(None, None, None, 0, 0.0, "the workers' decode and prefill step times are not "
                              f"measured yet (at least {MIN_STEPS} of each in the window)")
        costs = self.costs(m)
        cur = self.evaluate(*bounds.clamp(*current), m, costs)
        chosen, note = None, ""
        sizes = bounds.sizes()
        i = 0
        while i < len(sizes) and chosen is None:
            total = sum(sizes[i])
            same = [s for s in sizes[i:] if sum(s) == total]
            i += len(same)
            preds = [self.evaluate(p, d, m, costs) for p, d in same]
            ok = [x for x in preds if x.meets]
            if ok:
                chosen = min(ok, key=lambda x: x.slack(self.cfg))
            elif self.clock() - t0 > self.cfg.budget_s:
                note = f"search stopped at its {self.cfg.budget_s:g} s budget (sizes of {total} workers)"
                break
        if chosen is None:
            top = (bounds.max_prefill, bounds.max_decode)
            chosen = self.evaluate(*top, m, costs)
            note = note or "no size within the bounds meets the SLOs: the largest"
        target = (chosen.prefill, chosen.decode)
        here = bounds.clamp(*current)
        heavier = replace(m, arrival_rate=m.arrival_rate * (1.0 + self.cfg.shrink_headroom))
        shrink = tuple(self.evaluate(*s, heavier, costs) for s in _neighbours(here, -1, bounds)
                       if s[0] >= target[0] and s[1] >= target[1])  # toward the chosen size only
        grow = ()
        if observed_miss and target[0] <= here[0] and target[1] <= here[1]:
            grow = tuple(self.evaluate(*s, m, costs) for s in _neighbours(here, +1, bounds))
        return SizeChoice(target, chosen, cur, self.runs - runs0, self.clock() - t0, note, shrink, grow)


def _neighbours(size: tuple[int, int], step: int, bounds: Bounds) -> list[tuple[int, int]]:
    """`size` with one pool changed by `step` (prefill first), where the bounds allow it."""
    out = [(size[0] + step, size[1]), (size[0], size[1] + step)]
    return [s for s in out if bounds.clamp(*s) == s]


def sim_config_for(engine, local_prefill_threshold: int, admission: AdmissionConfig) -> SimConfig:
    """The simulator's scheduler limits from a live pool's EngineConfig (the server's own settings)."""
    return SimConfig(max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=engine.max_num_batched_tokens,
                     max_model_len=engine.max_model_len or 8192, block_size=engine.block_size,
                     enable_prefix_caching=engine.enable_prefix_caching, max_waiting=engine.max_waiting,
                     record_itl=False, router=RouterConfig(local_prefill_threshold=local_prefill_threshold),
                     admission=admission)
