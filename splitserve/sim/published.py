"""Published measurements: the four that calibrate the hardware families, and the ones that only
check them (never fitted). `fit_family()` re-derives a family's fitted parameter from its point;
`python -m splitserve.sim.published` prints the calibration and the validation table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from splitserve.sim.cost import FAMILIES, Deployment, FamilyParams, StepCost
from splitserve.sim.hardware import get_hardware
from splitserve.sim.models import get_model


@dataclass(frozen=True)
class Point:
    hardware: str
    units: int | None  # None: the simulator's default sizing
    model: str
    weight_dtype: str
    kind: str  # "single" (one stream's output tok/s) | "offline" (output tok/s, all requests at t=0)
    value: float  # output tokens/s
    source: str
    context: int = 1024  # single stream: tokens in context while decoding
    input_len: int = 0  # offline workload
    output_len: int = 0
    batch: int = 0
    use: str = "check"  # "calibrate" | "check"
    tp: int | None = None  # the submission's tensor parallelism, when it differs from the default sizing


CALIBRATION = [
    Point("cs3", None, "llama-3.1-8b", "bf16", "single", 1800, "Cerebras Inference launch, Aug 2024 (16-bit)",
          use="calibrate"),
    Point("groq-lpu", None, "llama-3.1-8b", "int8", "single", 751, "Groq, Artificial Analysis 2024 (8-bit)",
          use="calibrate"),
    Point("h100", 1, "llama-3.1-8b", "fp8", "single", 242, "best H100 cloud provider, Artificial Analysis 2024",
          use="calibrate"),
    Point("h200", 1, "llama-2-70b", "fp8", "offline", 4488, "MLPerf Inference v4.1, 1x H200, Llama-2-70B offline",
          input_len=294, output_len=294, batch=1024, use="calibrate"),
]

# Published figures the model is checked against, never fitted (docs/simulator.md lists them
# with the simulator's prediction). Speculative decoding and other software changes are not
# modelled, so figures obtained with them are expected to exceed the prediction.
CHECKS = [
    Point("cs3", None, "llama-3.1-70b", "bf16", "single", 450, "Cerebras Inference launch, Aug 2024 (70B on 4 CS-3)"),
    Point("cs3", None, "llama-3.1-70b", "bf16", "single", 2100,
          "Cerebras, Oct 2024 (after a software update incl. speculative decoding)"),
    Point("cs3", None, "llama-3.1-405b", "bf16", "single", 969, "Cerebras, Nov 2024 (Llama-3.1-405B)"),
    Point("groq-lpu", None, "llama-3.1-70b", "int8", "single", 250, "Groq Llama-3.1-70B, Artificial Analysis 2024"),
    Point("h100", 8, "llama-2-70b", "fp8", "offline", 24525 / 8,
          "MLPerf Inference v4.x, 8x H100 SXM ~24,500 tok/s offline (approx.), per GPU, as 4 x TP2",
          input_len=294, output_len=294, batch=1024, tp=2),
    Point("mi300x", 1, "llama-2-70b", "fp8", "offline", 3062,
          "MLPerf Inference v4.1, 8x MI300X ~24,000 tok/s offline (AMD, approx.), per GPU",
          input_len=294, output_len=294, batch=1024),
    Point("b200", 1, "llama-2-70b", "fp4", "offline", 11264,
          "MLPerf Inference v4.1 preview, 1x B200 Llama-2-70B offline (FP4)",
          input_len=294, output_len=294, batch=1024),
]


def deployment_for(p: Point, family: FamilyParams | None = None, max_model_len: int = 8192) -> Deployment:
    from splitserve.sim.deploy import default_kv_dtype, plan_pool
    from splitserve.sim.simulator import SimConfig

    hw, model = get_hardware(p.hardware), get_model(p.model)
    cfg = SimConfig(max_model_len=min(max_model_len, model.max_context))
    plan = plan_pool(hw, model, units=p.units, weight_dtype=p.weight_dtype,
                     kv_dtype=default_kv_dtype(p.weight_dtype), cfg=cfg, tp=p.tp)
    d = plan.deployment
    if family is not None:
        d = replace(d, family=family)
    return d


def predict(p: Point, family: FamilyParams | None = None, num_requests: int = 1500) -> float:
    """The simulator's output tok/s for a published point: one stream's, or offline throughput
    per unit (one replica simulated; replicas are identical and share the load evenly)."""
    d = deployment_for(p, family)
    if p.kind == "single":
        return StepCost(d).single_stream_tok_s(p.context)
    return offline_throughput(d, p, num_requests) / d.units


def offline_throughput(d: Deployment, p: Point, num_requests: int) -> float:
    """MLPerf offline: every request queued at t=0; output tokens/s over the whole run."""
    from splitserve.bench import workloads as wl
    from splitserve.sim.simulator import PoolSpec, SimConfig, Simulation

    cfg = SimConfig(max_num_seqs=p.batch, max_num_batched_tokens=8192, max_model_len=2048,
                    record_itl=False, max_waiting=10**7)
    blocks = d.kv_capacity_tokens // cfg.block_size
    pool = PoolSpec("both", 1, blocks, StepCost(d), kv_bytes_per_token=d.kv_bytes_per_token,
                    num_layers=d.model.num_layers)
    sim = Simulation(cfg, [pool])
    specs = wl.synthetic(input_len=p.input_len, output_len=p.output_len, num_requests=num_requests,
                         arrival=wl.Arrival(float("inf")), seed=0)
    sink = sim.run(specs)
    return sink.out_tokens / max(sink.last_end - sink.first_start, 1e-12)


def fit_family(p: Point, lo: float, hi: float, field_name: str, iters: int = 40, num_requests: int = 1500) -> float:
    """Bisection on one family parameter so that predict(p) matches p.value."""
    base = FAMILIES[get_hardware(p.hardware).family]
    increasing = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        got = predict(p, replace(base, **{field_name: mid}), num_requests)
        if increasing is None:
            g_lo = predict(p, replace(base, **{field_name: lo}), num_requests)
            g_hi = predict(p, replace(base, **{field_name: hi}), num_requests)
            increasing = g_hi > g_lo
        if (got < p.value) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


FITS = {  # point index in CALIBRATION -> (parameter, bracket)
    0: ("layer_floor_s", 1e-6, 100e-6),
    1: ("layer_floor_s", 1e-6, 200e-6),
    2: ("eff_mem", 0.2, 1.0),
    3: ("eff_compute", 0.1, 1.0),
}


def main() -> None:
    print("calibration (fitted parameter -> catalog value):")
    for i, p in enumerate(CALIBRATION):
        name, lo, hi = FITS[i]
        fitted = fit_family(p, lo, hi, name, iters=25 if p.kind == "offline" else 40)
        fam = get_hardware(p.hardware).family
        print(f"  {fam:8} {name:14} fitted {fitted:.4g}  catalog {getattr(FAMILIES[fam], name):.4g}   "
              f"({p.model} on {p.hardware}: {p.value:g} tok/s, {p.source})")
    print("\ncalibration points reproduced, and checks:")
    for p in CALIBRATION + CHECKS:
        got = predict(p)
        print(f"  {p.use:9} {p.hardware:9} {p.model:15} {p.weight_dtype:5} {p.kind:7} published {p.value:8.0f} "
              f"simulated {got:8.0f} ({(got / p.value - 1) * 100:+5.0f}%)  {p.source}")


if __name__ == "__main__":
    main()
