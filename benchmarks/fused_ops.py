"""Fused decode ops (splitserve.kernels.fused) against the torch code they replace, A/B rounds.

    python benchmarks/fused_ops.py                           # both models, batch 1 and 32, 1 and 2 threads
    python benchmarks/fused_ops.py --model smol --batch 1 --threads 2 --rounds 7
    python benchmarks/fused_ops.py --ops attn --ctx 100,2000   # attention only, B=1 contexts

References ("torch" column): the unfused model code, i.e. ``*_ref`` in fused.py for the
elementwise ops and ``splitserve.models.attention.decode_attention`` (index_select gather of
the padded slots + two bf16 matmuls, as the runner drives it today) for attention, given the
``decode_slots``/``decode_padding`` the runner builds. Attention inputs cycle through enough KV
cache copies (one per layer, up to --layers, >= --cold-mb in all) that, as in a real step, the
cache is not L2-resident. Each round times every case's torch and fused variants in a shuffled
order; the table shows medians over rounds and the median of per-round time ratios. "busy" is
the largest share of CPU other processes took during a round (on a shared 2-core host, rounds
with busy > ~0.05 are noise). "layer" rows sum one decoder layer's worth of the ops (2 fused
add+norms, rotary, write_kv, silu_mul, attention at the first attention context).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics as st
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from linear_kernels import OthersCPU, wait_quiet  # noqa: E402

from splitserve.kernels import fused  # noqa: E402
try:  # the unfused decode path the runner used before the fused kernel
    from splitserve.models.attention import decode_attention  # noqa: E402
except ImportError:  # pragma: no cover - removed from the model code: compare with the fp32 reference
    decode_attention = None

MODELS = {  # hidden, heads, kv heads, head_dim, intermediate, layers
    "smol": (576, 9, 3, 64, 1536, 30),
    "0.85b": (2048, 32, 8, 64, 5632, 24),
}
OPS = ("rms_norm", "add_rms_norm", "rotary", "write_kv", "silu_mul", "attn")


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


def rope_tables(T, D, g):
    pos = torch.randint(0, 4096, (T,), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    f = torch.outer(pos, inv)
    emb = torch.cat((f, f), -1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def attn_case(B, lens, Hq, Hk, D, nlayers, cold_mb, bs, g):
    """(ref, fused, objs): objs are per-layer (q, k_cache, v_cache) copies plus shared metadata."""
    nblk = [-(-L // bs) for L in lens]
    nb = sum(nblk) + 1
    per = nb * bs * Hk * D * 2 * 2
    ncopy = max(1, min(nlayers, int(cold_mb * 1e6 // per) + 1))
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(B, max(nblk), dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[i : i + n].int()
        i += n
    ctx = torch.tensor(lens, dtype=torch.int32)
    # what the runner builds today for decode_attention
    L = max(lens)
    pos = torch.arange(L)
    tl = table.long()
    slots = tl[:, pos // bs] * bs + pos % bs
    padding = (pos.unsqueeze(0) >= ctx.long().unsqueeze(1))[:, None, None, :]
    slots.masked_fill_(padding[:, 0, 0, :], 0)  # as the runner does: padding reads slot 0
    scale = D ** -0.5
    objs = []
    for _ in range(ncopy):
        kc = torch.randn(nb * bs, Hk, D, generator=g).to(torch.bfloat16)
        vc = torch.randn(nb * bs, Hk, D, generator=g).to(torch.bfloat16)
        qkv = torch.randn(B, (Hq + 2 * Hk) * D, generator=g).to(torch.bfloat16)
        objs.append((qkv[:, : Hq * D].view(B, Hq, D), kc, vc))

    def ref(o):
        if decode_attention is None:
            return fused.paged_decode_attention_ref(o[0], o[1], o[2], table, ctx, bs, scale)
        return decode_attention(o[0], o[1], o[2], slots, padding, scale)

    def fus(o):
        return fused.paged_decode_attention(o[0], o[1], o[2], table, ctx, bs, scale)

    err = (ref(objs[0]).float() - fus(objs[0]).float()).abs().max().item()
    return ref, fus, objs, err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=["all", *MODELS])
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--ctx", default="100,500,2000", help="B=1 attention contexts")
    ap.add_argument("--ctx-batch", type=int, default=300, help="mean context for batch > 1 (+-50)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.04, help="seconds per variant per round")
    ap.add_argument("--cold-mb", type=float, default=64.0)
    args = ap.parse_args()
    if not fused.kernels_available():
        print("# fused kernels unavailable here: both columns run torch code", file=sys.stderr)
    ops = args.ops.split(",")
    models = list(MODELS) if args.model == "all" else [args.model]
    print(f"torch {torch.__version__}, {args.rounds} rounds, block_size {args.block_size}")
    print(f"{'model':6} {'thr':>3} {'B':>3} {'op':14} {'shape':22} {'torch us':>9} {'fused us':>9} "
          f"{'speedup':>7} {'busy':>5}  max|diff|")
    g = torch.Generator().manual_seed(0)
    for model in models:
        H, Hq, Hk, D, I, nlayers = MODELS[model]
        for B in [int(b) for b in args.batch.split(",")]:
            cases = []  # (op, shape, ref, fused, objs, err)
            x = torch.randn(B, H, generator=g).to(torch.bfloat16)
            r = torch.randn(B, H, generator=g).to(torch.bfloat16)
            w = (1 + 0.1 * torch.randn(H, generator=g)).to(torch.bfloat16)
            if "rms_norm" in ops:
                cases.append(("rms_norm", f"[{B},{H}]", lambda o: fused.rms_norm_ref(o, w, 1e-5),
                              lambda o: fused.rms_norm(o, w, 1e-5), [x],
                              (fused.rms_norm_ref(x, w, 1e-5).float() - fused.rms_norm(x, w, 1e-5).float()).abs().max().item()))
            if "add_rms_norm" in ops:
                cases.append(("add_rms_norm", f"[{B},{H}]", lambda o: fused.add_rms_norm_ref(o, r, w, 1e-5),
                              lambda o: fused.add_rms_norm(o, r, w, 1e-5), [x],
                              (fused.add_rms_norm_ref(x, r, w, 1e-5)[0].float()
                               - fused.add_rms_norm(x, r, w, 1e-5)[0].float()).abs().max().item()))
            if "rotary" in ops:
                qkv = torch.randn(B, (Hq + 2 * Hk) * D, generator=g).to(torch.bfloat16)
                q = qkv[:, : Hq * D].view(B, Hq, D)
                k = qkv[:, Hq * D : (Hq + Hk) * D].view(B, Hk, D)
                cos, sin = rope_tables(B, D, g)
                rq, _ = fused.apply_rotary_ref(q, k, cos, sin)
                err = (rq.float() - fused.apply_rotary(q.clone(), k.clone(), cos, sin)[0].float()).abs().max().item()
                cases.append(("rotary", f"q[{B},{Hq},{D}] k view", lambda o: fused.apply_rotary_ref(o[0], o[1], cos, sin),
                              lambda o: fused.apply_rotary(o[0], o[1], cos, sin), [(q, k)], err))
            if "write_kv" in ops:
                qkv2 = torch.randn(B, (Hq + 2 * Hk) * D, generator=g).to(torch.bfloat16)
                kk = qkv2[:, Hq * D : (Hq + Hk) * D].view(B, Hk, D)
                vv = qkv2[:, (Hq + Hk) * D :].view(B, Hk, D)
                cache = torch.zeros(2, 4096, Hk, D, dtype=torch.bfloat16)
                slots = torch.randperm(4096, generator=g)[:B]
                cases.append(("write_kv", f"k,v[{B},{Hk},{D}] views", lambda o: fused.write_kv_ref(kk, vv, o[0], o[1], slots),
                              lambda o: fused.write_kv(kk, vv, o[0], o[1], slots), [(cache[0], cache[1])], 0.0))
            if "silu_mul" in ops:
                gu = torch.randn(B, 2 * I, generator=g).to(torch.bfloat16)
                cases.append(("silu_mul", f"[{B},{2 * I}]", fused.silu_mul_ref, fused.silu_mul, [gu],
                              (fused.silu_mul_ref(gu).float() - fused.silu_mul(gu).float()).abs().max().item()))
            if "attn" in ops:
                if B == 1:
                    ctxs = [[int(c)] for c in args.ctx.split(",")]
                else:
                    ctxs = [[int(v) for v in torch.randint(args.ctx_batch - 50, args.ctx_batch + 51, (B,), generator=g)]]
                for lens in ctxs:
                    ref, fus, objs, err = attn_case(B, lens, Hq, Hk, D, nlayers, args.cold_mb, args.block_size, g)
                    desc = f"L={lens[0]}" if B == 1 else f"L~{args.ctx_batch}"
                    cases.append(("attn", f"{Hq}/{Hk}x{D} {desc}", ref, fus, objs, err))
            for thr in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(thr)
                T = {(i, v): [] for i in range(len(cases)) for v in (0, 1)}
                busy = []
                for _ in range(args.rounds):
                    wait_quiet(max_wait=2.0)
                    with OthersCPU() as oc:
                        order = [(i, v) for i in range(len(cases)) for v in (0, 1)]
                        random.shuffle(order)
                        for i, v in order:
                            c = cases[i]
                            T[(i, v)].append(time_calls(c[2 + v], c[4], args.min_time))
                    busy.append(oc.frac)
                layer_t = [0.0, 0.0]
                first_attn = True
                for i, (op, shape, *_rest) in enumerate(cases):
                    tr, tf = st.median(T[(i, 0)]), st.median(T[(i, 1)])
                    sp = st.median([a / b for a, b in zip(T[(i, 0)], T[(i, 1)])])
                    if op in ("add_rms_norm", "rotary", "write_kv", "silu_mul") or (op == "attn" and first_attn):
                        mult = 2 if op == "add_rms_norm" else 1
                        layer_t[0] += mult * tr
                        layer_t[1] += mult * tf
                        first_attn = first_attn and op != "attn"
                    print(f"{model:6} {thr:3d} {B:3d} {op:14} {shape:22} {tr * 1e6:9.1f} {tf * 1e6:9.1f} "
                          f"{sp:7.2f} {max(busy):5.2f}  {cases[i][5]:.2g}", flush=True)
                if layer_t[1] > 0:
                    print(f"{model:6} {thr:3d} {B:3d} {'layer':14} {'2norm+rot+kv+silu+attn':22} "
                          f"{layer_t[0] * 1e6:9.1f} {layer_t[1] * 1e6:9.1f} {layer_t[0] / layer_t[1]:7.2f}", flush=True)
            torch.set_num_threads(max(int(t) for t in args.threads.split(",")))


if __name__ == "__main__":
    main()
