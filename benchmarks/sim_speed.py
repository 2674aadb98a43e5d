"""Simulator speed: simulated requests (and events) per wall-clock second, one core.

Iteration-level fidelity: every scheduler step of every worker is simulated with the real
Scheduler / BlockManager (and Router when there are several workers).

    python benchmarks/sim_speed.py                      # the reference 10,000-request run
    python benchmarks/sim_speed.py --requests 1000000 --units 1000 --stream /tmp/recs.jsonl
    python benchmarks/sim_speed.py --profile            # cProfile the reference run
    SPLITSERVE_PURE_PYTHON=1 python benchmarks/sim_speed.py   # ignore a `splitserve accel build`

"code" in the output says which ran: the pure-Python source or the mypyc build of the same
source (`splitserve accel build`, splitserve/accel.py).

Reference workload: 10,000 requests, Poisson arrivals, prompts uniform 256-1024 tokens
(chunked prefill: the step budget is 512 tokens, so long prompts take two steps), outputs uniform
64-192 tokens, Llama-3.1-8B (bf16) on H100s, prefix caching on, inter-token gaps recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def build(args):
    from splitserve.bench import workloads as wl
    from splitserve.sim.deploy import plan_pool, pool_spec
    from splitserve.sim.hardware import get_hardware
    from splitserve.sim.models import get_model
    from splitserve.sim.simulator import RecordSink, SimConfig, Simulation

    cfg = SimConfig(max_model_len=args.max_model_len, record_itl=not args.no_itl)
    hw, model = get_hardware(args.hardware), get_model(args.model)
    plan = plan_pool(hw, model, units=args.units, weight_dtype=args.dtype, kv_dtype="bf16", cfg=cfg,
                     max_blocks_per_worker=args.max_kv_blocks)
    sink = RecordSink(stream_path=args.stream)
    sim = Simulation(cfg, [pool_spec(plan, "both")], sink=sink)
    rate = args.rate_per_unit * plan.units
    specs = wl.synthetic(input_len=wl.parse_length(args.input_len), output_len=wl.parse_length(args.output_len),
                         num_requests=args.requests, arrival=wl.Arrival(rate), seed=args.seed)
    return sim, specs, plan, rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--units", type=int, default=1, help="H100s (one replica each for the 8B model)")
    ap.add_argument("--rate-per-unit", type=float, default=12.0, help="requests/s per unit (~80%% busy)")
    ap.add_argument("--hardware", default="h100")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--input-len", default="uniform:256:1024")
    ap.add_argument("--output-len", default="uniform:64:192")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-kv-blocks", type=int, default=None, help="cap per scheduler (thousand-unit runs)")
    ap.add_argument("--no-itl", action="store_true")
    ap.add_argument("--stream", default=None, help="stream records to this JSONL (bounded memory)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None, help="append the result as a JSON line here")
    args = ap.parse_args()

    from splitserve import accel

    sim, specs, plan, rate = build(args)
    t0 = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        sink = sim.run(specs)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        sink = sim.run(specs)
    wall = time.perf_counter() - t0
    tokens = sink.builder.out_tokens
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sim_s = sink.builder.last_end - sink.builder.first_start
    res = {
        "requests": sink.builder.n, "completed": sink.builder.ok, "units": plan.units, "workers": len(sim.workers),
        "rate": rate, "wall_s": round(wall, 3), "requests_per_s": round(sink.builder.n / wall, 1),
        "events_per_s": round(sim.num_events / wall, 1), "steps_per_s": round(sim.num_steps / wall, 1),
        "token_steps_per_s": round(tokens / wall, 1), "events": sim.num_events, "steps": sim.num_steps,
        "output_tokens": tokens, "simulated_s": round(sim_s, 2), "max_rss_mb": round(rss_mb, 1),
        "mean_batch": round(tokens / max(sim.num_steps, 1), 1),
        "workload": f"{args.requests} x Poisson {rate:g}/s, in {args.input_len}, out {args.output_len}",
        "deployment": plan.describe(), "python": sys.version.split()[0], "code": accel.describe(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
