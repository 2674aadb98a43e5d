"""Linear-layer backends of splitserve.kernels on the model shapes, interleaved A/B rounds.

    python benchmarks/linear_kernels.py                    # both models, M=1,4,32,512
    python benchmarks/linear_kernels.py --model smol --M 1,4 --rounds 7
    python benchmarks/linear_kernels.py --fp32             # add fp32 torch/onednn rows
    python benchmarks/linear_kernels.py --hot              # one weight copy (cache-resident
                                                           # for small shapes) instead of cold

Weights are "cold" by default: each backend cycles through enough copies of the weight
(>= --cold-mb) that every call streams it from DRAM, as in a real decode step where all
layers together exceed the L3. Each round measures the read bandwidth (fp32 torch.sum over a
256 MiB buffer) and then every backend in a shuffled order; the table shows medians over
rounds, "%bw" = achieved weight GB/s / bandwidth of the same round, and per-round time ratios
against torch and onednn. Rounds wait (up to 5 s) for other processes to go quiet, and the
"busy" column is the largest share of CPU other processes took during a round: on a 2-core
host, an OpenMP thread descheduled for a timeslice makes a call take ~8 ms, so busy rounds
are meaningless.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics as st
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from splitserve.kernels import available_backends, prepare_linear  # noqa: E402

SHAPES = {
    "smol": [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
             ("lm_head", 49152, 576)],
    "0.85b": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 11264, 2048), ("down", 2048, 5632),
              ("lm_head", 32000, 2048)],
}


def _cpu_busy():
    with open("/proc/stat") as f:
        v = [int(a) for a in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        s = f.read().rsplit(")", 1)[1].split()
    return sum(v[:8]) - v[3] - v[4], int(s[11]) + int(s[12]), sum(v[:8])


class OthersCPU:
    """Share of all CPU time used by other processes during the with-block (Linux only)."""

    def __enter__(self):
        try:
            self.a = _cpu_busy()
        except OSError:
            self.a = None
        self.frac = 0.0
        return self

    def __exit__(self, *exc):
        if self.a is not None:
            b = _cpu_busy()
            busy, me, tot = (b[i] - self.a[i] for i in range(3))
            self.frac = max(0, busy - me) / max(tot, 1)


def wait_quiet(max_wait=5.0, thresh=0.03):
    t0 = time.time()
    while time.time() - t0 < max_wait:
        with OthersCPU() as o:
            time.sleep(0.2)
        if o.frac < thresh:
            return


def time_calls(fn, objs, min_time):
    for o in objs[:2]:
        fn(o)
    n, t0 = 0, time.perf_counter()
    while True:
        for o in objs:
            fn(o)
        n += len(objs)
        t = time.perf_counter() - t0
        if t >= min_time:
            return t / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=["all", *SHAPES])
    ap.add_argument("--M", default="1,4,32,512", help="comma-separated token counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.08, help="seconds per backend per round")
    ap.add_argument("--cold-mb", type=float, default=160.0, help="weight copies per backend (MB)")
    ap.add_argument("--hot", action="store_true", help="a single weight copy")
    ap.add_argument("--backends", default="", help="default: all available bf16 backends")
    ap.add_argument("--fp32", action="store_true", help="also fp32 weights (torch, onednn)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    Ms = [int(m) for m in args.M.split(",")]
    bk = args.backends.split(",") if args.backends else available_backends(torch.bfloat16)
    variants = [(b, torch.bfloat16) for b in bk]
    if args.fp32:
        variants += [(b, torch.float32) for b in available_backends(torch.float32)]
    names = [b if dt == torch.bfloat16 else f"{b}-fp32" for b, dt in variants]
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, backends: {', '.join(names)}, "
          f"{'hot' if args.hot else 'cold'} weights, {args.rounds} rounds")
    bwbuf = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB

    def bw_probe():
        bwbuf.sum()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            bwbuf.sum()
            best = min(best, time.perf_counter() - t0)
        return bwbuf.numel() * 4 / best / 1e9

    hdr = (f"{'model':6} {'layer':8} {'N x K':>12} {'M':>5} {'backend':12} {'time us':>9} {'GB/s':>6} "
           f"{'%bw':>5} {'GFLOP/s':>8} {'vs torch':>8} {'vs onednn':>9} {'bw GB/s':>7} {'busy':>5}")
    models = list(SHAPES) if args.model == "all" else [args.model]
    print(hdr)
    g = torch.Generator().manual_seed(0)
    for model in models:
        for layer, N, K in SHAPES[model]:
            ncopy = 1 if args.hot else max(2, int(args.cold_mb * 1e6 // (N * K * 2)))
            ws = [torch.randn(N, K, generator=g).to(torch.bfloat16) for _ in range(ncopy)]
            ops = {}
            for name, (b, dt) in zip(names, variants):
                ops[name] = [prepare_linear(w.to(dt), None, backend=b) for w in ws]
                got = ops[name][0].backend
                if got != b:
                    print(f"# {name}: got {got} instead", file=sys.stderr)
            del ws
            for M in Ms:
                xs = {dt: torch.randn(M, K, generator=g).to(dt) for dt in (torch.bfloat16, torch.float32)}
                T = {n: [] for n in names}
                bws, busy = [], []
                min_time = args.min_time if M <= 64 else max(args.min_time, 0.2)
                for _ in range(args.rounds):
                    wait_quiet()
                    with OthersCPU() as o:
                        bws.append(bw_probe())
                        order = list(zip(names, variants))
                        random.shuffle(order)
                        for name, (b, dt) in order:
                            x = xs[dt]
                            T[name].append(time_calls(lambda op: op(x), ops[name], min_time))
                    busy.append(o.frac)
                for name, (b, dt) in zip(names, variants):
                    nbytes = N * K * (2 if dt == torch.bfloat16 else 4)
                    t = st.median(T[name])
                    gbs = nbytes / t / 1e9
                    pbw = st.median([nbytes / ti / 1e9 / bw * 100 for ti, bw in zip(T[name], bws)])
                    rt = (f"{st.median([a / c for a, c in zip(T['torch'], T[name])]):8.2f}"
                          if "torch" in T else f"{'':8}")
                    ro = (f"{st.median([a / c for a, c in zip(T['onednn'], T[name])]):9.2f}"
                          if "onednn" in T else f"{'':9}")
                    print(f"{model:6} {layer:8} {f'{N}x{K}':>12} {M:5d} {name:12} {t * 1e6:9.1f} {gbs:6.1f} "
                          f"{pbw:5.0f} {2 * M * N * K / t / 1e9:8.0f} {rt} {ro} {st.median(bws):7.1f} "
                          f"{max(busy):5.2f}", flush=True)
            del ops


if __name__ == "__main__":
    main()
