"""Does the accelerator cost model's step shape hold on a machine where steps can be measured?

The simulator's accelerator families (splitserve/sim/cost.py) price a step as
    pnorm(compute, memory) + floors,  compute = (T + half) * f_tok + A * f_pair,
    memory = weights + (K + T) * kv,  pnorm(c, m) = (c^p + m^p)^(1/p)
i.e. matmuls of few rows run below peak, attention grows with context, and compute and memory
overlap imperfectly near the ridge. This script fits that form, and the sharp max(compute,
memory) it replaces (half = 0, p = infinity), to the real engine's measured step times on this
CPU (the samples `splitserve simulate calibrate` stored in splitserve/sim/data/local_cpu.json:
prefill, chunked prefill, decode batches at several contexts, mixed decode + prefill steps).
Fit on decode and single-prompt prefill steps; the mixed and chunked steps are held out.

    python benchmarks/step_shape_cpu.py [--calibration PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

NAMES = ("f_tok", "f_pair", "half", "weights", "kv", "floor", "samp", "p")


def step(x: dict, s: dict) -> float:
    c = (s["T"] + x["half"]) * x["f_tok"] + s["A"] * x["f_pair"]
    m = x["weights"] + (s["K"] + s["T"]) * x["kv"]
    core = max(c, m) if x["p"] >= 64 else (c ** x["p"] + m ** x["p"]) ** (1 / x["p"])
    return core + x["floor"] + s["S"] * x["samp"]


def loss(x: dict, rows: list[dict]) -> float:
    return sum(math.log(step(x, s) / s["seconds"]) ** 2 for s in rows)


def fit(rows: list[dict], free: tuple[str, ...], x: dict) -> dict:
    best = loss(x, rows)
    for scale in (1.0, 0.5, 0.25, 0.1, 0.05, 0.02):
        improved = True
        while improved:
            improved = False
            for n in free:
                for f in (math.exp(scale), math.exp(-scale)):
                    t = dict(x)
                    t[n] = max(t[n] * f, 1e-15)
                    if n == "p":
                        t[n] = min(max(t[n], 1.0), 64.0)
                    got = loss(t, rows)
                    if got < best - 1e-12:
                        best, x, improved = got, t, True
    return x


def errors(x: dict, rows: list[dict]) -> list[float]:
    return [abs(step(x, s) / s["seconds"] - 1) for s in rows]


def main() -> int:
    from splitserve.sim.calibration import by_tag, load_calibration

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", default=None)
    args = ap.parse_args()
    cal = load_calibration(args.calibration)
    if cal is None:
        print(f"no calibration file at {args.calibration}: run `splitserve simulate calibrate`", file=sys.stderr)
        return 2
    rows = by_tag(cal.samples)
    held = [s for s in rows if s["tag"].startswith(("mixed", "chunked"))]
    train = [s for s in rows if s not in held]
    start = {"f_tok": 5e-4, "f_pair": 1e-8, "half": 8.0, "weights": 7e-3, "kv": 2e-6, "floor": 1e-3,
             "samp": 1e-4, "p": 3.0}
    sharp = fit(train, ("f_tok", "f_pair", "weights", "kv", "floor", "samp"), {**start, "half": 0.0, "p": 64.0})
    smooth = fit(train, NAMES, start)
    print(f"engine samples: {cal.model} on {cal.machine.get('cpu')} ({cal.machine.get('torch_threads')} threads), "
          f"{cal.date}; {len(train)} shapes fitted, {len(held)} held out (mixed and chunked-prefill steps)")
    print("| model | fitted shapes: mean / max abs error | held-out mixed + chunked: mean / max | half | p |")
    print("|---|---:|---:|---:|---:|")
    for name, x in (("sharp max(compute, memory)", sharp), ("ramp + smooth p-norm", smooth)):
        a, b = errors(x, train), errors(x, held)
        print(f"| {name} | {statistics.fmean(a):.1%} / {max(a):.1%} | {statistics.fmean(b):.1%} / {max(b):.1%} | "
              f"{x['half']:.3g} | {'inf' if x['p'] >= 64 else format(x['p'], '.3g')} |")
    for tag in ("prefill 8", "prefill 64", "prefill 512", "decode 1x32", "decode 16x128", "mixed 16+64",
                "mixed 32+256", "chunked 1536 #2"):
        s = next((r for r in rows if r["tag"] == tag), None)
        if s is not None:
            print(f"  {tag:16} measured {s['seconds'] * 1e3:7.2f} ms   sharp {step(sharp, s) * 1e3:7.2f}   "
                  f"smooth {step(smooth, s) * 1e3:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
