"""Fit a family's step-cost terms to its `use="fit"` points (published.py): Nelder-Mead in
log space on the named parameters, minimising the sum of squared log errors. The result is what
families.py carries; `python -m splitserve.sim.published --fit hopper/trtllm` re-derives it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

from splitserve.sim.families import FAMILIES, FamilyParams

# What each family's points can pin down (the rest stays as families.py has it: shared shape
# terms from the Hopper fit, floors as assumed).
FIT_PARAMS = {
    "hopper/trtllm": ("eff_compute", "eff_mem", "step_floor_s", "gemm_half_tokens", "overlap", "tp_seq_overhead_s"),
    "blackwell/trtllm": ("eff_compute_fp4", "eff_mem", "tp_seq_overhead_s"),
    "hopper/trtllm-0.5": ("request_overhead_s", "collective_latency_s"),
    "ampere/trtllm": ("eff_compute", "eff_mem", "request_overhead_s", "collective_latency_s"),
    "mi300/vllm": ("eff_compute", "eff_mem"),
    "mi300/mlperf": ("eff_compute",),
    "trainium/neuron": ("eff_mem",),
    "tpu/jetstream": ("eff_mem",),
    "wafer/cerebras": ("layer_floor_s",),
    "wafer/cerebras-2024-10": ("layer_floor_s",),
    "lpu/groq": ("layer_floor_s",),
}
BOUNDS = {"eff_compute": (0.05, 1.0), "eff_compute_fp4": (0.05, 1.0), "eff_mem": (0.05, 1.0),
          "step_floor_s": (5e-6, 5e-3), "layer_floor_s": (1e-7, 2e-4), "gemm_half_tokens": (1.0, 2048.0),
          "overlap": (1.2, 16.0), "request_overhead_s": (1e-5, 0.1),
          "collective_latency_s": (1e-7, 1e-3), "tp_seq_overhead_s": (1e-7, 2e-4)}
_MULTI_GPU_TERMS = {"tp_seq_overhead_s", "collective_latency_s"}  # a one-GPU point does not depend on these
FIT_REQUESTS = 1500  # offline points: at most this many requests while fitting (steady state well before)


def loss(points, fam: FamilyParams) -> float:
    from splitserve.sim.published import log_error, predict

    return sum(log_error(p, predict(p, fam, num_requests=min(p.num_requests or 1500, FIT_REQUESTS))) ** 2
               for p in points)


def fit(key: str, points, iters: int = 60, log=print, names: tuple[str, ...] | None = None) -> FamilyParams:
    """Nelder-Mead on the log of each fitted parameter (clipped to BOUNDS); `names` (default
    FIT_PARAMS[key]) fits a subset, the rest kept as families.py has them."""
    import numpy as np

    fam0 = FAMILIES[key]
    names = names or FIT_PARAMS[key]

    def make(v) -> FamilyParams:
        vals = {n: float(min(BOUNDS[n][1], max(BOUNDS[n][0], math.exp(x)))) for n, x in zip(names, v)}
        return replace(fam0, **vals)

    def f(v) -> float:
        return loss(points, make(v))

    x0 = np.array([math.log(getattr(fam0, n) or 0.5) for n in names])
    simplex = [x0] + [x0 + 0.35 * np.eye(len(names))[i] for i in range(len(names))]
    vals = [f(x) for x in simplex]
    for it in range(iters):
        order = np.argsort(vals)
        simplex, vals = [simplex[i] for i in order], [vals[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        xr = centroid + (centroid - simplex[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2 * (centroid - simplex[-1])
            fe = f(xe)
            simplex[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            simplex[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                simplex[-1], vals[-1] = xc, fc
            else:  # shrink towards the best
                simplex = [simplex[0]] + [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex[1:]]
                vals = [vals[0]] + [f(x) for x in simplex[1:]]
        best = make(simplex[int(np.argmin(vals))])
        log(f"  {it + 1}: loss {min(vals):.4f} " + ", ".join(f"{n}={getattr(best, n):.4g}" for n in names))
        if max(vals) - min(vals) < 1e-4:
            break
    return make(simplex[int(np.argmin(vals))])


def fit_main(argv: list[str]) -> None:
    from splitserve.sim.published import POINTS, family_key

    ap = argparse.ArgumentParser(prog="python -m splitserve.sim.published --fit")
    ap.add_argument("family", help="family/stack, e.g. hopper/trtllm")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--params", help="comma-separated subset of the family's fitted terms (e.g. tp_seq_overhead_s: "
                                     "only the multi-GPU fit points depend on it, so only they are used)")
    args = ap.parse_args(argv)
    names = tuple(args.params.split(",")) if args.params else FIT_PARAMS[args.family]
    unknown = [n for n in names if n not in FIT_PARAMS[args.family]]
    if unknown:
        ap.error(f"{args.family} does not fit {', '.join(unknown)}; it fits {', '.join(FIT_PARAMS[args.family])}")
    pts = [p for p in POINTS if p.use == "fit" and family_key(p) == args.family]
    if set(names) <= _MULTI_GPU_TERMS:
        pts = [p for p in pts if (p.tp or 1) > 1]
    print(f"fitting {args.family} ({', '.join(names)}) on {len(pts)} points")
    fam = fit(args.family, pts, args.iters, names=names)
    print({n: getattr(fam, n) for n in names})
