"""`splitserve plan`: the cheapest (or least power-hungry) deployment that meets the SLOs.

For each candidate hardware it searches the number of replicas (aggregated) and, with
`--disaggregated`, the prefill and decode pool sizes (prefill hardware x decode hardware over the
candidates), simulating the workload at the given rate for each size. A size meets the SLOs when
at least `--slo-fraction` of the requests have TTFT <= --slo-ttft-ms and TPOT <= --slo-tpot-ms
(and, with --slo-itl-ms, a longest gap between two tokens within it: goodput, as bench computes it)
and the run reached a steady state (a pool that falls ever further behind never meets an SLO,
whatever its averages say). The search assumes more replicas never hurt (binary search).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

DEFAULT_CANDIDATES = ("h100", "h200", "b200", "mi300x", "trn2", "tpu-v6e", "cs3", "groq-lpu")


@dataclass
class Candidate:
    label: str
    hardware: str | None
    prefill: str | None
    decode: str | None
    units: int
    usd_per_hour: float
    power_kw: float
    fraction: float
    ttft_p90: float | None
    tpot_p90: float | None
    meets: bool


def build_parser() -> argparse.ArgumentParser:
    from splitserve.sim.cli import build_parser as sim_parser

    p = sim_parser("splitserve plan")
    p.description = __doc__.split("\n\n")[0]
    g = p.add_argument_group("planning")
    g.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                   help="comma list of hardware ids to consider")
    g.add_argument("--objective", choices=("cost", "power"), default="cost")
    g.add_argument("--slo-fraction", type=float, default=0.9, help="share of requests that must meet the SLOs")
    g.add_argument("--max-replicas", type=int, default=64, help="per pool")
    g.add_argument("--disaggregated", action="store_true", help="also search prefill/decode pool pairs")
    return p


def plan_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    error = _usage_error(args)
    if error:
        print(f"splitserve plan: {error}", file=sys.stderr)
        return 2
    if args.num_requests is None:
        args.num_requests = 300
    args.no_itl = args.slo_itl_ms is None  # gaps are recorded only when an SLO needs them
    args.quiet = True
    args.records_jsonl = None
    from splitserve.sim.cli import _resolve_model
    from splitserve.sim.hardware import get_hardware

    try:
        model = _resolve_model(args)
        rate = float(args.rate)
        hws = [get_hardware(h) for h in args.candidates.split(",") if h.strip()]
    except ValueError as exc:
        print(f"splitserve plan: {exc}", file=sys.stderr)
        return 2
    search = _PlanSearch(args, model, rate)
    results = search.aggregated(hws)
    if args.disaggregated:
        results += search.disaggregated(hws)
    if not results:
        print("no candidate meets the SLOs within the search limits")
        return 1
    results.sort(key=search.key)
    _print_plan(results, model, rate, args)
    return 0


def _usage_error(args) -> str | None:
    """Why these options cannot be planned for, or None."""
    if args.slo_ttft_ms is None and args.slo_tpot_ms is None and args.slo_itl_ms is None:
        return "give --slo-ttft-ms, --slo-tpot-ms and/or --slo-itl-ms"
    if args.rate is None or "," in str(args.rate):
        return "give one --rate (requests/s) to plan for"
    ignored = _ignored_options(args)
    if ignored:
        return (f"{', '.join(ignored)} would have no effect (plan picks the hardware from "
                "--candidates; pool options need --disaggregated)")
    return None


class _PlanSearch:
    """Simulates candidate deployments of one model at one rate and finds the smallest that meet
    the SLOs."""

    def __init__(self, args, model, rate: float):
        import copy

        from splitserve.sim.cli import POOL_OPTIONS
        from splitserve.sim.deploy import default_kv_dtype

        self.args, self.model, self.rate = args, model, rate
        self.weight_dtype = args.weight_dtype or model.default_dtype
        self.kv_dtype = args.kv_dtype or default_kv_dtype(self.weight_dtype)
        self.max_len = args.max_model_len or min(model.max_context, 8192)
        # An aggregated candidate runs without the options that only act on two pools.
        self.agg_args = copy.copy(args)
        for k in POOL_OPTIONS:
            setattr(self.agg_args, k, None)
        self.agg_args.local_prefill_threshold = 0
        self.key = (lambda c: c.usd_per_hour) if args.objective == "cost" else (lambda c: c.power_kw)

    def replica_units(self, hw) -> int:
        from splitserve.sim.deploy import min_units, shape_for

        tp, pp = shape_for(hw, self.model, min_units(hw, self.model, self.weight_dtype, self.kv_dtype, self.max_len))
        return tp * pp

    def evaluate(self, hardware=None, prefill=None, decode=None) -> Candidate:
        from splitserve.sim.cli import run_once

        a = self.agg_args if hardware else self.args
        a.hardware, a.prefill, a.decode = hardware, prefill, decode
        try:
            res, stats = run_once(a, self.model, self.rate)
        except ValueError as exc:
            return Candidate(str(exc), hardware, prefill, decode, 0, math.inf, math.inf, 0.0, None, None, False)
        s = res.summary
        frac = s.goodput.fraction if s.goodput else 0.0
        label = hardware or f"{prefill} -> {decode}"
        return Candidate(label, hardware, prefill, decode, stats["units"], stats["usd_per_hour"], stats["power_kw"],
                         frac, s.ttft_ms.p90, s.tpot_ms.p90,
                         frac >= self.args.slo_fraction and s.steady_state is not False)

    def smallest(self, make) -> Candidate | None:
        """Binary search the replica count in [1, max_replicas] for the smallest that meets the SLOs."""
        max_replicas = self.args.max_replicas
        hi_c = make(max_replicas)
        if not hi_c.meets:
            return None
        lo, hi, best = 1, max_replicas, hi_c
        while lo < hi:
            mid = (lo + hi) // 2
            c = make(mid)
            if c.meets:
                hi, best = mid, c
            else:
                lo = mid + 1
        return best

    def aggregated(self, hws) -> list[Candidate]:
        """The smallest aggregated deployment on each candidate hardware that meets the SLOs."""
        results = []
        for hw in hws:
            try:
                u = self.replica_units(hw)
            except ValueError:
                continue
            if hw.family == "cpu":
                continue
            best = self.smallest(lambda r, hw=hw, u=u: self.evaluate(hardware=f"{hw.name}:{r * u}"))
            if best is not None:
                results.append(best)
            print(f"  {hw.name}: " + (f"{best.units} units meet the SLOs" if best else "no size up to "
                                      f"{self.args.max_replicas} replicas meets the SLOs"), file=sys.stderr)
        return results

    def disaggregated(self, hws) -> list[Candidate]:
        """For each prefill x decode hardware pair, the best pool sizes that meet the SLOs."""
        results = []
        for ph in hws:
            for dh in hws:
                if ph.family == "cpu" or dh.family == "cpu":
                    continue
                found = self._best_pair(ph, dh)
                if found is not None:
                    results.append(found)
                    print(f"  {found.label}: {found.units} units meet the SLOs", file=sys.stderr)
        return results

    def _best_pair(self, ph, dh) -> Candidate | None:
        pu, du = self.replica_units(ph), self.replica_units(dh)
        found = None
        for d in (1, 2, 4, 8, 16, 32, 64):
            if d > self.args.max_replicas:
                break
            c = self.smallest(
                lambda p, d=d: self.evaluate(prefill=f"{ph.name}:{p * pu}", decode=f"{dh.name}:{d * du}")
            )
            if c is not None and (found is None or self.key(c) < self.key(found)):
                found = c
            elif found is not None:
                break
        return found


def _ignored_options(args) -> list[str]:
    """Options plan would silently ignore: it picks the hardware itself, and pool options only act
    on the disaggregated search."""
    from splitserve.sim.cli import POOL_OPTIONS

    ignored = [f"--{k}" for k in ("hardware", "prefill", "decode") if getattr(args, k)]
    if not args.disaggregated:
        ignored += [f"--{k.replace('_', '-')}" for k in POOL_OPTIONS if getattr(args, k) is not None]
        ignored += ["--local-prefill-threshold"] if args.local_prefill_threshold else []
    return ignored


def _print_plan(results: list[Candidate], model, rate: float, args) -> None:
    print(f"## plan: {model.name}, {rate:g} req/s, SLO TTFT <= {args.slo_ttft_ms} ms, TPOT <= {args.slo_tpot_ms} ms, "
          f"longest gap <= {args.slo_itl_ms} ms "
          f"for {args.slo_fraction:.0%} of requests; objective: {args.objective}\n")
    print("| deployment | units | $/h | kW | meets SLOs | p90 TTFT ms | p90 TPOT ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in results:
        print(f"| {c.label.split(':')[0] if c.hardware else c.label} | {c.units} | {c.usd_per_hour:,.2f} | "
              f"{c.power_kw:,.1f} | {c.fraction:.0%} | {c.ttft_p90 or 0:,.1f} | {c.tpot_p90 or 0:,.2f} |")
    b = results[0]
    print(f"\nbest: {b.hardware or (b.prefill + ' + ' + b.decode)} ({b.units} unit{'s' if b.units != 1 else ''}, "
          f"${b.usd_per_hour:,.2f}/h, "
          f"{b.power_kw:,.1f} kW)")
