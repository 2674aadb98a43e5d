"""`splitserve simulate | plan` (`hardware | models` are in `sim.catalog_cli`).

    splitserve simulate --model llama-3.1-8b --hardware h100:8 --rate 20 --num-requests 2000 \\
        --input-len 1024 --output-len 256 --output sim.json
    splitserve simulate --model llama-3.1-70b --prefill h100:8 --decode cs3:4 --link ib-ndr --rate 5
    splitserve simulate --model demo --hardware local-cpu --rate 2 --input-len 256 --output-len 64
    splitserve simulate calibrate            # measure the real engine here -> local-cpu
    splitserve plan --model llama-3.1-70b --rate 10 --slo-ttft-ms 500 --slo-tpot-ms 50
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime, timezone
from typing import Any


def _die(msg: str, prog: str = "splitserve simulate") -> int:
    print(f"{prog}: {msg}", file=sys.stderr)
    return 2


# ---- simulate ------------------------------------------------------------------------------------
def build_parser(prog: str = "splitserve simulate") -> argparse.ArgumentParser:
    from splitserve.bench.cli import add_workload_args

    p = argparse.ArgumentParser(
        prog=prog,
        description="Simulate a deployment on a virtual clock: the live scheduler, block manager and "
        "router, with a cost model in place of the model. Same workload options and results JSON as "
        "`splitserve bench`. Subcommand: `calibrate` (measure this machine for local-cpu).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("deployment")
    g.add_argument("--model", default="llama-3.1-8b", help="catalog name (`splitserve models`) or a config.json")
    g.add_argument("--hardware", default=None, metavar="HW[:N]",
                   help="one aggregated pool: N units of HW (`splitserve hardware`); without N, the fewest "
                   "units that hold the weights plus a working KV pool")
    g.add_argument("--prefill", default=None, metavar="HW[:N]", help="disaggregated: the prefill pool")
    g.add_argument("--decode", default=None, metavar="HW[:N]", help="disaggregated: the decode pool")
    g.add_argument("--link", default=None,
                   help="KV link between the pools: a catalog link (ib-ndr, efa, nvlink4, cs3-io, ...) or GB/s "
                   "(default: the decode hardware's scale-out link)")
    g.add_argument("--weight-dtype", default=None, help="bf16, fp8, int8, fp4, mxfp4 (default: the model's)")
    g.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: fp8 for <=8-bit weights, else bf16)")
    g.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel units per replica (default: sized); disaggregated: both pools")
    g.add_argument("--pp", type=int, default=None,
                   help="pipeline stages per replica (default: sized); disaggregated: both pools")
    for role in ("prefill", "decode"):
        g.add_argument(f"--{role}-tp", type=int, default=None, help=f"disaggregated: the {role} pool's TP (over --tp)")
        g.add_argument(f"--{role}-pp", type=int, default=None, help=f"disaggregated: the {role} pool's PP (over --pp)")
        g.add_argument(f"--{role}-stack", default=None, help=f"disaggregated: the {role} pool's stack (over --stack)")
    g.add_argument("--stack", default=None,
                   help="serving software whose calibrated terms apply (`splitserve hardware` lists each "
                   "family's; default: the family's calibrated stack), e.g. trtllm, vllm, sglang")
    g.add_argument("--ep", type=int, default=None,
                   help="expert parallel degree (mixture-of-experts; = TP: experts split over the replica's units, "
                   "tokens sent to them all-to-all on the scale-up link)")
    g.add_argument("--attention-dp", action="store_true",
                   help="attention data parallel: each TP rank attends its own sequences with whole KV heads "
                   "(no KV copies when KV heads < TP, e.g. MLA)")
    g.add_argument("--spec-draft", default=None, metavar="MODEL|ngram",
                   help="speculative decoding on decode (and aggregated) pools: a draft model from the catalog, "
                   "or ngram (self-drafting: no accelerator time)")
    g.add_argument("--spec-tokens", type=int, default=None, help="draft tokens per step (default 4)")
    g.add_argument("--spec-acceptance", type=float, default=None,
                   help="probability that each drafted token is accepted (required with --spec-draft)")
    g.add_argument("--kv-memory-fraction", type=float, default=None,
                   help="fraction of each unit's memory for weights + KV cache (default: the catalog's, "
                   "0.9 for most; vLLM's --gpu-memory-utilization, TensorRT-LLM's free-memory fraction)")
    g.add_argument("--price", type=float, default=None, help="USD per unit-hour (default: the catalog's)")
    g.add_argument("--calibration", default=None, help="local-cpu calibration JSON (default: the shipped one)")

    g = p.add_argument_group("scheduler and router (per worker, as `splitserve serve`)")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--max-model-len", type=int, default=None, help="default: min(model context, 8192)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-waiting", type=int, default=1024)
    g.add_argument("--max-kv-blocks", type=int, default=None,
                   help="cap KV blocks per scheduler (default 4 x max-num-seqs full-length requests; "
                   "lower it for thousand-worker runs: it only shortens prefix-cache retention)")
    g.add_argument("--local-prefill-threshold", type=int, default=0,
                   help="disaggregated: prefill on the decode worker when at most this many prompt tokens "
                   "are uncached there (conditional disaggregation)")
    g.add_argument("--gateway-queue", type=int, default=1024,
                   help="disaggregated: requests waiting at the gateway for a decode seat and KV; beyond, 503")
    g.add_argument("--no-decode-backpressure", action="store_true",
                   help="disaggregated: start prefill without waiting for decode capacity (the first token "
                   "comes early and the wait becomes a stall after it)")

    g = add_workload_args(p)
    g.add_argument("--output", default=None, help="write results JSON here (the bench schema)")
    g.add_argument("--records-jsonl", default=None,
                   help="stream per-request records to this JSONL file instead of keeping them (bounded "
                   "memory for huge runs; results JSON then has summary only)")
    g.add_argument("--no-itl", action="store_true", help="do not record inter-token gaps (faster)")
    g.add_argument("--label", default=None)
    g.add_argument("--quiet", action="store_true")
    return p


def _resolve_model(args) -> Any:
    from splitserve.sim.models import get_model

    return get_model(args.model)


def build_deployment(args, model, cfg, *, log=lambda s: None) -> tuple[list, Any, dict]:
    """(pool specs, KV link or None, description) from parsed options."""
    from splitserve.sim.calibration import load_calibration
    from splitserve.sim.deploy import default_kv_dtype, plan_pool, pool_spec
    from dataclasses import replace

    from splitserve.sim.families import DEFAULT_STACK
    from splitserve.sim.hardware import LINKS, get_link, parse_hardware_arg
    from splitserve.sim.models import get_model

    weight_dtype = args.weight_dtype or model.default_dtype
    kv_dtype = args.kv_dtype or default_kv_dtype(weight_dtype)
    speculative = None
    if args.spec_draft:
        draft = None if args.spec_draft.lower() == "ngram" else get_model(args.spec_draft)
        speculative = (args.spec_tokens or 4, args.spec_acceptance, draft)

    def one(text: str, role: str, tp=None, pp=None, stack=None):
        hw, n = parse_hardware_arg(text)
        if args.price is not None:
            hw = replace(hw, price_per_hour=args.price)
        cal = None
        if hw.family == "cpu" and ((tp or 1) > 1 or (pp or 1) > 1):
            raise ValueError("local-cpu runs one engine per unit: tensor and pipeline parallelism are not "
                             "modelled there")
        if hw.family == "cpu":
            cal = load_calibration(args.calibration)
            if cal is None:
                log("local-cpu: no calibration file; run `splitserve simulate calibrate` (using fallback values)")
            else:
                cal = cal.scaled_for(model).for_role(role)
        if args.kv_memory_fraction is not None:
            hw = replace(hw, memory_usable=args.kv_memory_fraction)
        ep = args.ep
        if ep is not None and tp is None:  # EP spans the TP group: size the replica by it
            tp = ep
        plan = plan_pool(hw, model, units=n, weight_dtype=weight_dtype, kv_dtype=kv_dtype, cfg=cfg, tp=tp, pp=pp,
                         calibration=cal, max_blocks_per_worker=getattr(args, "max_kv_blocks", None),
                         stack=stack, ep=ep, attn_dp=args.attention_dp)
        fam = plan.deployment.family
        log(f"{role}: {plan.describe()}")
        log(f"  sizing: {plan.note}")
        if cal is None:
            log(f"  cost model: {plan.deployment.hardware.family}/{stack or DEFAULT_STACK[hw.family]}"
                + ("" if fam.calibrated else " (UNCALIBRATED: borrowed terms)") + f"; {fam.source}")
        return plan, pool_spec(plan, role, speculative)

    info: dict[str, Any] = {"weight_dtype": weight_dtype, "kv_dtype": kv_dtype}
    if args.hardware:
        if args.prefill or args.decode:
            raise ValueError("give --hardware (aggregated) or --prefill and --decode (disaggregated), not both")
        _reject_disaggregated_only(args)
        plan, spec = one(args.hardware, "both", args.tp, args.pp, args.stack)
        info["pools"] = [_pool_info(plan, "both")]
        return [spec], None, info
    if not (args.prefill and args.decode):
        raise ValueError("give --hardware HW[:N], or --prefill HW[:N] and --decode HW[:N]")
    pplan, pspec = one(args.prefill, "prefill", _pick(args.prefill_tp, args.tp), _pick(args.prefill_pp, args.pp),
                       _pick(args.prefill_stack, args.stack))
    dplan, dspec = one(args.decode, "decode", _pick(args.decode_tp, args.tp), _pick(args.decode_pp, args.pp),
                       _pick(args.decode_stack, args.stack))
    if args.link:
        link = get_link(args.link)
    else:
        link = LINKS[dplan.deployment.hardware.scale_out]
    log(f"KV link: {link.name}, {link.bandwidth / 1e9:g} GB/s, {link.latency_s * 1e6:g} us")
    info["pools"] = [_pool_info(pplan, "prefill"), _pool_info(dplan, "decode")]
    info["link"] = {"name": link.name, "GBps": link.bandwidth / 1e9, "latency_us": link.latency_s * 1e6}
    return [pspec, dspec], link, info


POOL_OPTIONS = ("prefill_tp", "prefill_pp", "prefill_stack", "decode_tp", "decode_pp", "decode_stack", "link")


def _pick(own, shared):
    return own if own is not None else shared


def _reject_disaggregated_only(args) -> None:
    """Options that only act on two pools: with one they would be ignored, so they are an error."""
    given = [f"--{k.replace('_', '-')}" for k in POOL_OPTIONS
             if getattr(args, k, None) is not None]
    if getattr(args, "local_prefill_threshold", 0):
        given.append("--local-prefill-threshold")
    if given:
        raise ValueError(f"{', '.join(given)} only apply to a disaggregated deployment (--prefill and --decode)")


def check_options(args) -> None:
    """Every option must act on the run; one that would be silently ignored is an error."""
    if getattr(args, "no_itl", False) and getattr(args, "slo_itl_ms", None) is not None:
        raise ValueError("--slo-itl-ms needs the gaps between tokens: drop --no-itl")
    if args.calibration is not None:
        names = [t for t in (args.hardware, args.prefill, args.decode) if t]
        from splitserve.sim.hardware import parse_hardware_arg

        if not any(parse_hardware_arg(t)[0].family == "cpu" for t in names):
            raise ValueError("--calibration applies to local-cpu only, and no pool runs on local-cpu")
    for k in ("tp", "pp", "prefill_tp", "prefill_pp", "decode_tp", "decode_pp"):
        v = getattr(args, k, None)
        if v is not None and v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
    if getattr(args, "spec_draft", None) is None:
        if args.spec_tokens is not None or args.spec_acceptance is not None:
            raise ValueError("--spec-tokens and --spec-acceptance need --spec-draft")
    elif args.spec_acceptance is None:
        raise ValueError("--spec-draft needs --spec-acceptance (the share of drafted tokens accepted)")
    if not getattr(args, "prefill", None) and (getattr(args, "no_decode_backpressure", False)
                                               or getattr(args, "gateway_queue", 1024) != 1024):
        raise ValueError("--no-decode-backpressure and --gateway-queue act on disaggregated pools: add --prefill/--decode")
    if getattr(args, "gateway_queue", 0) < 0:
        raise ValueError("--gateway-queue must be >= 0")
    f = getattr(args, "kv_memory_fraction", None)
    if f is not None and not 0 < f <= 1:
        raise ValueError("--kv-memory-fraction must be in (0, 1]")


def _pool_info(plan, role: str) -> dict:
    from splitserve.sim.families import DEFAULT_STACK

    d = plan.deployment
    return {"role": role, "hardware": d.hardware.name, "units": plan.units, "replicas": plan.replicas,
            "tp": d.tp, "pp": d.pp, "ep": d.ep, "attention_dp": d.attn_dp, "family": d.hardware.family,
            "stack": d.stack or DEFAULT_STACK[d.hardware.family],
            "calibrated": d.family.calibrated if d.calibration is None else True,
            "microbatches": plan.microbatches, "workers": plan.num_workers,
            "kv_blocks_per_worker": plan.blocks_per_worker, "sizing": plan.note,
            "power_w_per_unit": d.hardware.power_w, "usd_per_unit_hour": d.hardware.price_per_hour}


def run_once(args, model, rate, *, log=lambda s: None):
    """One simulated run -> (BenchResult, sim stats dict)."""
    from splitserve import __version__
    from splitserve.bench.cli import _make_specs
    from splitserve.bench.schema import BenchResult, RunConfig
    from splitserve.cluster.admission import AdmissionConfig
    from splitserve.cluster.router import RouterConfig
    from splitserve.sim.simulator import RecordSink, SimConfig, Simulation

    max_len = args.max_model_len or min(model.max_context, 8192)
    cfg = SimConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    max_model_len=max_len, block_size=args.block_size,
                    enable_prefix_caching=not args.no_prefix_caching, max_waiting=args.max_waiting,
                    record_itl=not args.no_itl, seed=args.seed,
                    router=RouterConfig(local_prefill_threshold=args.local_prefill_threshold),
                    admission=AdmissionConfig(enabled=not getattr(args, "no_decode_backpressure", False),
                                              max_queue=getattr(args, "gateway_queue", 1024)))
    check_options(args)
    pools, link, info = build_deployment(args, model, cfg, log=log)
    specs, winfo, conc = _make_specs(args, rate, None)
    sink = RecordSink(stream_path=args.records_jsonl, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                      slo_itl_ms=args.slo_itl_ms)
    delay = max(p.cost.request_overhead_s for p in pools)
    sim = Simulation(cfg, pools, link=link, sink=sink, concurrency=conc, duration_s=args.duration,
                     request_delay_s=delay)
    t0 = time.perf_counter()
    sim.run(specs)
    wall = time.perf_counter() - t0
    summary = sink.summary()
    span = summary.duration_s
    units = sum(p["units"] for p in info["pools"])
    power_w = sum(p["units"] * p["power_w_per_unit"] for p in info["pools"])
    usd_h = sum(p["units"] * p["usd_per_unit_hour"] for p in info["pools"])
    busy = {w.role: [0.0, 0, 0.0, 0] for w in sim.workers}  # busy s, steps, and of them decode-only
    for w in sim.workers:
        b = busy[w.role]
        b[0] += w.busy_s
        b[1] += w.steps
        b[2] += w.decode_busy_s
        b[3] += w.decode_steps
    for p in info["pools"]:
        b = busy.get(p["role"], [0.0, 0, 0.0, 0])
        p["utilization"] = b[0] / max(span * p["workers"], 1e-12)
        # as /cluster's step_seconds / num_steps / decode_step_seconds / decode_steps
        p["busy_s"], p["steps"], p["decode_busy_s"], p["decode_steps"] = b
    out_tok = summary.total_output_tokens
    stats = {
        "wall_s": wall, "events": sim.num_events, "steps": sim.num_steps,
        "requests_per_wall_s": sink.builder.n / wall if wall > 0 else None,
        "events_per_wall_s": sim.num_events / wall if wall > 0 else None,
        "units": units, "power_kw": power_w / 1000.0, "usd_per_hour": usd_h,
        "joules_per_output_token": power_w * span / out_tok if out_tok else None,
        "usd_per_million_output_tokens": usd_h * span / 3600.0 / out_tok * 1e6 if out_tok else None,
    }
    if args.workload == "trace" and rate is None and conc is None:
        arrival_desc = "trace"
    else:
        arrival_desc = args.arrival if rate is not None and not math.isinf(rate) else None
    config = RunConfig(
        source="sim", model=model.name, workload=winfo, num_requests=args.num_requests, duration_s=args.duration,
        rate=None if rate is None or math.isinf(rate) else rate, arrival=arrival_desc,
        burstiness=args.burstiness if arrival_desc == "gamma" else None, concurrency=conc,
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, slo_itl_ms=args.slo_itl_ms, seed=args.seed,
        ignore_eos=True,
        tokenizer=None, label=args.label, started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        splitserve_version=__version__,
        extra={"deployment": info, "sim": stats,
               "scheduler": {"max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
                             "max_model_len": cfg.max_model_len, "block_size": cfg.block_size,
                             "enable_prefix_caching": cfg.enable_prefix_caching},
               "records_jsonl": args.records_jsonl},
    )
    return BenchResult(config=config, summary=summary, requests=sink.records if sink.keep else []), stats


def simulate_main(argv: list[str]) -> int:
    if argv and argv[0] == "calibrate":
        return calibrate_main(argv[1:])
    args = build_parser().parse_args(argv)
    from splitserve.bench import report
    from splitserve.bench.cli import UsageError, resolve_rates
    from splitserve.bench.schema import write_json

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    try:
        model = _resolve_model(args)
        rates = resolve_rates(args)
        if args.records_jsonl and len(rates) > 1:
            raise UsageError("--records-jsonl takes one rate")
        results = []
        for i, rate in enumerate(rates):
            res, stats = run_once(args, model, rate, log=log if i == 0 else (lambda s: None))
            results.append(res)
            log(f"simulated {res.summary.num_requests} requests in {stats['wall_s']:.2f} s wall: "
                f"{stats['requests_per_wall_s']:,.0f} requests/s, {stats['events_per_wall_s']:,.0f} events/s, "
                f"{stats['steps']:,} steps")
    except (ValueError, UsageError) as exc:
        return _die(str(exc))
    if args.output:
        write_json(args.output, results[0] if len(results) == 1 else results)
    for r in results:
        print(report.markdown_summary(r))
        print(_cost_lines(r))
    if len(results) > 1:
        print(report.markdown_sweep(results))
    if args.output:
        print(f"results: {args.output}")
    return 0


_POOL_NAMES = {"both": "aggregated pool", "prefill": "prefill pool", "decode": "decode pool"}


def _cost_lines(r) -> str:
    from splitserve.bench.metrics import health_line

    s = r.config.extra["sim"]
    pools = r.config.extra["deployment"]["pools"]
    util = ", ".join(f"{_POOL_NAMES.get(p['role'], p['role'])} {p['utilization'] * 100:.0f}% busy" for p in pools)
    units = s["units"]
    parts = [f"{units} unit{'s' if units != 1 else ''}, {s['power_kw']:.1f} kW, ${s['usd_per_hour']:.2f}/h; {util}"]
    if s.get("joules_per_output_token") is not None:
        parts.append(f"{s['joules_per_output_token']:.3g} J per output token; "
                     f"${s['usd_per_million_output_tokens']:.3g} per million output tokens "
                     "(at the list price, whole run)")
    health = health_line(r.summary)
    if health:
        parts.append(health)
    return "\n".join(parts) + "\n"


# ---- calibrate -----------------------------------------------------------------------------------
def calibrate_main(argv: list[str]) -> int:
    from splitserve.sim.calibration import DEFAULT_PATH, calibrate

    p = argparse.ArgumentParser(prog="splitserve simulate calibrate",
                                description="Measure the real engine on this machine and fit local-cpu step times.")
    p.add_argument("--model", default="demo")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as serve)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer shapes (about a third of the time)")
    p.add_argument("--output", default=DEFAULT_PATH)
    p.add_argument("--refit", action="store_true", help="fit again from the samples already in --output")
    p.add_argument("--neighbor", action="store_true",
                   help="also measure how much a busy second engine on this host slows a step (1P1D on one "
                        "machine); with --refit, measure only that")
    args = p.parse_args(argv)
    if args.refit:
        from splitserve.sim.calibration import refit

        cal = refit(args.output)
    else:
        cal = calibrate(model=args.model, threads=args.threads, dtype=args.dtype, quick=args.quick,
                        repeats=args.repeats, output=args.output, log=lambda s: print(s, file=sys.stderr))
    if args.neighbor:
        from splitserve.sim.calibration import save
        from splitserve.sim.neighbor import measure

        threads = cal.engine.get("threads") or 1
        cal.neighbor = measure(model=cal.engine.get("model", args.model), threads=threads,
                               dtype=cal.engine.get("dtype", args.dtype), log=lambda s: print(s, file=sys.stderr))
        save(cal, args.output)
    c = cal.coef
    print(f"local-cpu calibration ({cal.model}, {cal.machine.get('cpu')}, {cal.date}):")
    print(f"  step_s = {c['c0'] * 1e3:.3f} ms + {c['c_tok'] * 1e6:.2f} us/token "
          f"+ {c.get('c_tok_mid', 0.0) * 1e6:.2f} us/token beyond {c.get('tok_knee', 0):.0f} + {c['c_seq'] * 1e6:.2f} us/seq "
          f"+ {c['c_pair'] * 1e9:.3f} ns/attention pair + {c['c_kv'] * 1e9:.2f} ns/KV token "
          f"+ {c['c_samp'] * 1e6:.1f} us/sample + {c['c_tok_big'] * 1e6:.2f} us/token beyond 64 "
          f"+ {c['c_kv_big'] * 1e9:.1f} ns/KV token beyond {c['kv_knee']:.0f}")
    print(f"  fit over {cal.fit['shapes']} shapes: mean |error| {cal.fit['mean_abs_rel_error'] * 100:.1f}%, "
          f"max {cal.fit['max_abs_rel_error'] * 100:.1f}%")
    if cal.neighbor:
        print(f"  beside a busy engine on this host: decode steps +{cal.neighbor['decode']:.1%}, "
              f"prefill steps +{cal.neighbor['prefill']:.1%}")
    print(f"written: {args.output}")
    return 0


# ---- plan ----------------------------------------------------------------------------------------
def plan_main(argv: list[str]) -> int:
    from splitserve.sim.plan import plan_main as _plan

    return _plan(argv)
