"""Published disaggregation results on their testbeds, simulated: DistServe (Figure 1), Splitwise
(Splitwise-HA/HH vs Baseline-H100), Mooncake (long prompts, TBT). Prints each deployment's highest
rate within its SLOs (90% of requests, steady state), the published figure, and the
`splitserve simulate` command behind it (add --rate R --num-requests 600).

    python benchmarks/sim_published_disagg.py            # the comparisons
    python benchmarks/sim_published_disagg.py --fit      # re-derive the ampere/distserve terms

tests/sim/test_published_disagg.py asserts the same comparisons with their tolerances; the setups
and sources are in splitserve/sim/repro.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _row(name: str, argv: list[str], lo: float, hi: float, gpus: int = 1, published: str = "") -> float:
    from splitserve.sim import repro

    t0 = time.perf_counter()
    cap = repro.capacity(argv, lo, hi)
    usd = repro.usd_per_hour(argv)
    print(f"| {name} | {cap:.2f} | {cap / gpus:.2f} | {cap / usd:.4f} | {published} | {time.perf_counter() - t0:.1f} s |")
    print(f"|   `splitserve simulate {shlex.join(argv)}` | | | | | |", flush=True)
    return cap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", action="store_true", help="fit ampere/distserve to DistServe's single-phase rates")
    args = ap.parse_args()
    from splitserve.sim import repro

    if args.fit:
        fam = repro.fit_distserve()
        print(f"ampere/distserve: eff_compute={fam.eff_compute:.3f} eff_mem={fam.eff_mem:.3f}")
        return 0
    print("| deployment | req/s within SLOs | per GPU | per USD/h | published | wall |")
    print("|---|---:|---:|---:|---|---:|")
    p = repro.DISTSERVE_PUBLISHED
    for name, gpus, pub in (("prefill_only", 1, f"{p['prefill_only']} (fitted)"),
                            ("decode_only", 1, f"{p['decode_only']} (fitted)"),
                            ("colocated", 1, f"{p['colocated']}"), ("2p1d", 3, f"{p['2p1d_per_gpu']} per GPU")):
        _row(f"DistServe {name}", repro.DISTSERVE[name], 0.25, 64, gpus, pub)
    for name, argv in repro.SPLITWISE.items():
        _row(f"Splitwise {name}", argv, 2, 128, 32, "HA: 1.4x throughput at 0.8x cost vs Baseline-H100")
    for name, argv in repro.MOONCAKE.items():
        _row(f"Mooncake {name}", argv, 0.25, 8, 32, "+75% requests within SLOs (disaggregated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
