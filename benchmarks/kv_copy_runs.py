"""The prefill worker's direct KV write when a request's blocks are scattered: one streaming copy
per run (the previous code) against one `copy_rows` call per layer for all runs, and a memcpy of
the same bytes in one piece (the ceiling). One thread, the demo model's KV shapes by default.

    python benchmarks/kv_copy_runs.py [--tokens 256] [--block-size 16] [--rounds 7]

Every other block is used on both sides, so a prompt of T tokens is T / block_size runs per
layer, the fragmentation a busy server's free-block queue produces.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    import torch

    from splitserve.kernels.fused import copy_rows, copy_stream, kernels_available

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bs, n_blocks = args.block_size, -(-args.tokens // args.block_size)
    slots = 2 * n_blocks * bs + bs
    caches = [[torch.randn(slots, args.heads, args.head_dim).to(torch.bfloat16) for _ in range(2)]
              for _ in range(args.layers)]
    dest = torch.zeros(args.layers, 2, slots, args.heads, args.head_dim, dtype=torch.bfloat16)
    runs = [(2 * b * bs, (2 * b + 1) * bs, min(bs, args.tokens - b * bs)) for b in range(n_blocks)]
    runs_t = torch.tensor(runs, dtype=torch.long)
    nbytes = 2 * args.layers * args.tokens * args.heads * args.head_dim * 2
    flat_src = torch.randn(nbytes // 2).to(torch.bfloat16)
    flat_dst = torch.empty_like(flat_src)

    def per_run():
        for layer, (k, v) in enumerate(caches):
            dk, dv = dest[layer, 0], dest[layer, 1]
            for a, b, n in runs:
                copy_stream(dk[b : b + n], k[a : a + n])
                copy_stream(dv[b : b + n], v[a : a + n])

    def one_call():
        for layer, (k, v) in enumerate(caches):
            copy_rows(dest[layer, 0], k, runs, runs_t)
            copy_rows(dest[layer, 1], v, runs, runs_t)

    ways = {"per-run copy_stream": per_run, "copy_rows, one call per layer": one_call,
            "memcpy of the same bytes in one piece": lambda: flat_dst.copy_(flat_src)}
    times = {k: [] for k in ways}
    for fn in ways.values():
        fn()
    for _ in range(args.rounds):  # interleaved: this machine drifts
        for k, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    ceiling = statistics.median(times["memcpy of the same bytes in one piece"])
    print(f"{args.tokens} tokens x {args.layers} layers x K,V ({nbytes / 1e6:.2f} MB) in {len(runs)} runs per "
          f"layer; kernels built: {kernels_available()}; medians of {args.rounds} interleaved rounds")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k:40s} {med * 1e6:9.1f} us  {nbytes / med / 1e9:6.2f} GB/s  {ceiling / med:6.1%} of memcpy")


if __name__ == "__main__":
    main()
