"""Aggregated vs disaggregated serving on the same machine and the same total cores.

    python benchmarks/disagg_vs_agg.py [--model demo] [--rates 0.5,1,2] [--duration 60]
                                       [--slo-ttft-ms 3000 --slo-tpot-ms 100] [--out results/disagg]

Modes: aggregated (one worker, 2 threads), aggregated with 1 thread (the per-worker cores of the
disaggregated pair, to separate the handoff's cost from the halving of prefill cores), and
disaggregated (1 prefill worker with 1 thread + 1 decode worker with 1 thread).

1. Low load: one request at a time (256-token prompt, 32 output tokens): TTFT and TPOT.
2. Mixed load: short chats (lognormal ~64-token prompts, 128 output tokens) with long prompts
   (2,000 tokens, 16 output tokens; 20% of arrivals) in one Poisson trace, at rising rates:
   p50/p99 TPOT, p99 TTFT, goodput under the stated SLOs. All load comes from `splitserve bench`;
   plots go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from splitserve.testing import ServerProcess  # noqa: E402

MODES = {
    "aggregated-2t": ["--threads", "2"],
    "aggregated-1t": ["--threads", "1"],
    "disaggregated-1p1d": ["--disaggregated", "--prefill-threads", "1", "--decode-threads", "1"],
}


def start_server(model: str, mode_args: list[str]) -> ServerProcess:
    return ServerProcess("--model", model, "--max-model-len", "4096", "--served-model-name", "m",
                         "--log-level", "WARNING", *mode_args, startup_timeout=300, check_leaks=False).start()


def bench(port: int, out: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "splitserve", "bench", "--base-url", f"http://127.0.0.1:{port}", "--model", "m",
           "--endpoint", "completions", "--tokenizer", "approx", "--quiet", "--output", out, *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def mixed_trace(path: str, rate: float, duration: float, long_frac: float, seed: int) -> int:
    rng = random.Random(seed)
    t, n = 0.0, 0
    with open(path, "w") as f:
        while True:
            t += rng.expovariate(rate)
            if t > duration:
                break
            if rng.random() < long_frac:
                row = {"timestamp": t, "input_length": 2000, "output_length": 16}
            else:
                row = {"timestamp": t, "input_length": max(8, int(rng.lognormvariate(4.1, 0.5))), "output_length": 128}
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


def pick(summary: dict, metric: str, stat: str) -> float:
    return (summary.get(metric) or {}).get(stat) or float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rates", default="0.5,1,2", help="mixed-load rates; 'none' runs the low-load part only")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--long-frac", type=float, default=0.2)
    ap.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="results/disagg")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rates = [] if args.rates == "none" else [float(r) for r in args.rates.split(",")]
    print(f"# disagg_vs_agg {time.strftime('%Y-%m-%d %H:%M')}: model {args.model}, SLO TTFT <= {args.slo_ttft_ms:.0f} ms, "
          f"TPOT <= {args.slo_tpot_ms:.0f} ms, mixed load = {1 - args.long_frac:.0%} chats + {args.long_frac:.0%} 2k-token prompts")
    results: dict[str, dict] = {}
    for mode in args.modes.split(","):
        server = start_server(args.model, MODES[mode])
        port = server.port
        try:
            low = bench(port, f"{args.out}/{mode}-low.json", "--concurrency", "1", "--num-requests", "20",
                        "--input-len", "256", "--output-len", "32", "--seed", "1")
            results[mode] = {"low": low["summary"], "mixed": {}}
            print(f"{mode:<20} low load: TTFT mean {pick(low['summary'], 'ttft_ms', 'mean'):7.1f} ms, "
                  f"TPOT mean {pick(low['summary'], 'tpot_ms', 'mean'):6.1f} ms", flush=True)
            for k, rate in enumerate(rates):
                trace = os.path.join(tempfile.gettempdir(), f"mixed-{rate}.jsonl")
                mixed_trace(trace, rate, args.duration, args.long_frac, seed=7)
                r = bench(port, f"{args.out}/{mode}-mixed-{rate}.json", "--workload", "trace", "--trace", trace,
                          "--rate", str(rate), "--slo-ttft-ms", str(args.slo_ttft_ms),
                          # A fresh prompt seed per run: the server keeps its prefix cache between
                          # runs, and repeated prompts would turn 2k-token prefills into cache hits.
                          "--slo-tpot-ms", str(args.slo_tpot_ms), "--seed", str(100 + k))
                s = r["summary"]
                results[mode]["mixed"][rate] = s
                good = s.get("goodput") or {}
                print(f"{mode:<20} rate {rate:4.1f}/s: TPOT p50 {pick(s, 'tpot_ms', 'p50'):6.1f} p99 {pick(s, 'tpot_ms', 'p99'):6.1f} ms, "
                      f"TTFT p99 {pick(s, 'ttft_ms', 'p99'):7.1f} ms, goodput {good.get('fraction', float('nan')):.0%}", flush=True)
        finally:
            server.stop()
    with open(f"{args.out}/summary.json", "w") as f:
        json.dump(results, f, indent=1)
    if rates:
        plot(results, rates, args)
    print("\n| mode | low-load TTFT mean ms | low-load TPOT mean ms | " +
          " | ".join(f"rate {r}: TPOT p50 / p99 ms, TTFT p99 ms, goodput" for r in rates) + " |")
    print("|---|---|---|" + "---|" * len(rates))
    for mode, res in results.items():
        cells = []
        for r in rates:
            s = res["mixed"][r]
            g = (s.get("goodput") or {}).get("fraction", float("nan"))
            cells.append(f"{pick(s, 'tpot_ms', 'p50'):.0f} / {pick(s, 'tpot_ms', 'p99'):.0f}, {pick(s, 'ttft_ms', 'p99'):.0f}, {g:.0%}")
        print(f"| {mode} | {pick(res['low'], 'ttft_ms', 'mean'):.0f} | {pick(res['low'], 'tpot_ms', 'mean'):.1f} | " +
              " | ".join(cells) + " |")
    return 0


def plot(results: dict, rates: list[float], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode, res in results.items():
        xs = rates
        axes[0].plot(xs, [pick(res["mixed"][r], "tpot_ms", "p50") for r in xs], "o-", label=f"{mode} p50")
        axes[0].plot(xs, [pick(res["mixed"][r], "tpot_ms", "p99") for r in xs], "x--", label=f"{mode} p99")
        axes[1].plot(xs, [pick(res["mixed"][r], "ttft_ms", "p99") for r in xs], "o-", label=mode)
        axes[2].plot(xs, [(res["mixed"][r].get("goodput") or {}).get("fraction", 0) for r in xs], "o-", label=mode)
    axes[0].set(title="TPOT under prefill pressure", xlabel="requests/s", ylabel="ms")
    axes[1].set(title="TTFT p99", xlabel="requests/s", ylabel="ms")
    axes[2].set(title=f"goodput (TTFT<={args.slo_ttft_ms:.0f}ms, TPOT<={args.slo_tpot_ms:.0f}ms)",
                xlabel="requests/s", ylabel="fraction meeting both")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{args.out}/disagg_vs_agg.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
