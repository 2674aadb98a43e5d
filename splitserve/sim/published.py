"""Published measurements: those that fit each hardware family's terms (use="fit") and those
that only check them (use="check", never fitted). `python -m splitserve.sim.published` prints
the error table (`--fit FAMILY/STACK` re-derives a family's fitted terms, see fitting.py).

Every point names its source; the catalog of sources is SOURCES. Throughputs are output tokens/s
of the whole system of `units` units; times are milliseconds.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, replace

from splitserve.sim.families import FamilyParams, get_family
from splitserve.sim.hardware import get_hardware
from splitserve.sim.models import get_model

SOURCES = {
    "trtllm-1.0": "NVIDIA TensorRT-LLM perf-overview, v1.0 release (github.com/NVIDIA/TensorRT-LLM, "
                  "docs/source/performance/perf-overview.md @ 00f3768, 2025): trtllm-bench throughput, PyTorch "
                  "backend, every request queued at once, fixed ISL/OSL, ModelOpt FP8/FP4 checkpoints",
    "trtllm-1.2": "NVIDIA TensorRT-LLM perf-overview, developer guide (docs/source/developer-guide/perf-overview.md @ "
                  "03e27c7, 2025): as trtllm-1.0, per-GPU output throughput; MoE models with attention data "
                  "parallel + expert parallel (DEP)",
    "trtllm-0.19": "NVIDIA TensorRT-LLM perf-overview, v0.19.0 release (nvidia.github.io/TensorRT-LLM/0.19.0/"
                   "performance/perf-overview.html; docs/source/performance/perf-overview.md of that release, 2025): "
                   "trtllm-bench throughput, PyTorch backend (as trtllm-1.0), the same model on 1, 2, 4 and 8 GPUs "
                   "(TP sweep); its rows that trtllm-1.0 repeats (same chip, model, TP, ISL/OSL) are within -13% to "
                   "+9% of trtllm-1.0's",
    "trtllm-0.6": "NVIDIA TensorRT-LLM performance.md, v0.6.1 (docs/source/performance.md @ 138f96d, Dec 2023): "
                  "static-batch throughput (gptSessionBenchmark) and, from v0.5, batch-1 first-token latency",
    "mlperf-4.1": "MLPerf Inference Datacenter v4.1 (Aug 2024), Llama-2-70B offline, closed division: each figure "
                  "is the 'Tokens per second' of mlperf_log_summary.txt in github.com/mlcommons/inference_results_v4.1 "
                  "(closed/NVIDIA/results/{H200-SXM-141GB-CTSx1,DGX-H100_H100-SXM-80GBx8,B200-SXM-180GBx1}_TRT, "
                  "closed/AMD/results/{1x,8x}MI300X_2xEPYC-9374F); OpenOrca, 274-291 output tokens per sample in "
                  "these logs, simulated as 294 in / 294 out; NVIDIA's run TensorRT-LLM (its no-eviction admission), "
                  "the H200 is the 1,000 W custom-thermal (CTS) part",
    "oracle-mi300x": "Oracle Cloud Infrastructure blog, 'Serving Llama 3.1 405B model with AMD Instinct MI300X "
                     "Accelerators', 10 Oct 2024: vLLM benchmark_latency / benchmark_throughput, FP8, TP8",
    "neuron-trn2": "AWS Neuron SDK, 'Tutorial: Using Speculative Decoding to improve Llama-3.3-70B inference "
                   "performance on Trn2 instances' (aws-neuron-sdk @ 06f3378, 2025): NxD Inference + vLLM, bf16, "
                   "TP64 with 2 logical cores per rank = 16 Trainium2 chips, batch 1, LLMPerf 10,000 in / 1,500 out",
    "jetstream": "AI-Hypercomputer/JetStream benchmark results table, 2024-04-24: Llama-3-8B on TPU v5e-8 "
                 "(max input 1,024, max output 1,024, cache 2,048)",
    "cerebras": "Cerebras Inference launch, 27 Aug 2024 (cerebras.ai/blog/introducing-cerebras-inference-ai-at-"
                "instant-speed): Llama-3.1-8B 1,800 and 70B 450 output tok/s, 16-bit weights",
    "cerebras-2024-10": "Cerebras, 24 Oct 2024, 'Cerebras Inference now 3x faster: Llama3.1-70B breaks 2,100 "
                        "tokens/s' (a software release on the same CS-3 systems)",
    "cerebras-2024-11": "Cerebras, 18 Nov 2024 (reported by Tom's Hardware, 20 Nov 2024): Llama-3.1-405B at 969 "
                        "output tok/s, 16-bit",
    "artificial-analysis": "Artificial Analysis provider benchmarks, 2024 (single-stream output speed)",
}


@dataclass(frozen=True)
class Point:
    hardware: str
    units: int | None  # None: the simulator's default sizing
    model: str
    weight_dtype: str
    kind: str  # single (tok/s of one stream) | offline (tok/s) | batch (tok/s of one static batch) | itl | ttft (ms)
    value: float
    source: str  # a SOURCES key
    note: str = ""
    context: int = 1024  # single / itl: tokens in context while decoding
    input_len: int = 0
    output_len: int = 0
    batch: int = 0  # offline: max sequences in a step; batch: the static batch
    use: str = "check"  # "fit" | "check"
    tp: int | None = None
    ep: int | None = None  # expert parallel (= tp)
    attn_dp: bool = False  # attention data parallel
    stack: str | None = None
    num_requests: int = 0  # offline: as the source ran it (0: 1,500)
    max_tokens: int = 8192  # tokens per step
    mem_fraction: float | None = None  # of each unit's memory for weights + KV, as the source ran it


_TRT = dict(source="trtllm-1.0", batch=2048, mem_fraction=0.93)
# trtllm-bench's request counts per ISL/OSL (the perf-overview's table)
_TRT_N = {(128, 128): 30000, (128, 2048): 3000, (128, 4096): 1500, (500, 2000): 3000, (1000, 1000): 3000,
          (1000, 2000): 1500, (2048, 128): 3000, (2048, 2048): 1500, (5000, 500): 1500, (20000, 2000): 1000}


def _trt(hw, units, model, dtype, rows, tp=None, fit=(), source="trtllm-1.0"):
    out = []
    for (i, o), v in rows.items():
        out.append(Point(hw, units, model, dtype, "offline", v, input_len=i, output_len=o, tp=tp,
                         num_requests=_TRT_N[(i, o)], use="fit" if (i, o) in fit else "check",
                         **{**_TRT, "source": source}))
    return out


# The v0.19 TP sweeps fit the stacks' cost per sequence per step on multi-GPU replicas (families.py
# tp_seq_overhead_s): no trtllm-1.0 row used as a fit point has more than one GPU. Decode-heavy and prefill-heavy rows
# at TP2, TP4 and TP8; the other rows of the same sweeps are not used.
_SWEEP = ((128, 2048), (2048, 128))
_TRT_SWEEPS = [
    *_trt("b200", 2, "llama-3.3-70b", "fp4", {(128, 2048): 15459.71, (2048, 128): 1610.69}, tp=2, fit=_SWEEP,
          source="trtllm-0.19"),
    *_trt("b200", 4, "llama-3.3-70b", "fp4", {(128, 2048): 23608.58, (2048, 128): 2707.58}, tp=4, fit=_SWEEP,
          source="trtllm-0.19"),
    *_trt("b200", 8, "llama-3.3-70b", "fp4", {(128, 2048): 30742.86, (2048, 128): 3717.82}, tp=8, fit=_SWEEP,
          source="trtllm-0.19"),
    *_trt("h200", 2, "llama-3.3-70b", "fp8", {(128, 2048): 8450.31, (2048, 128): 772.97}, tp=2, fit=_SWEEP,
          source="trtllm-0.19"),
    *_trt("h200", 4, "llama-3.3-70b", "fp8", {(128, 2048): 13438.71, (2048, 128): 1278.26}, tp=4, fit=_SWEEP,
          source="trtllm-0.19"),
    *_trt("h200", 8, "llama-3.3-70b", "fp8", {(128, 2048): 20750.58, (2048, 128): 1947.33}, tp=8, fit=_SWEEP,
          source="trtllm-0.19"),
]


POINTS: list[Point] = [
    # ---- Hopper, TensorRT-LLM ----------------------------------------------------------------------
    *_trt("h100", 1, "llama-3.1-8b", "fp8", {
        (128, 128): 28312, (128, 2048): 22714, (128, 4096): 14325, (500, 2000): 17660, (1000, 1000): 15220,
        (1000, 2000): 13899, (2048, 128): 3450, (2048, 2048): 9305, (5000, 500): 3459, (20000, 2000): 1351},
        fit={(128, 128), (2048, 128), (128, 2048)}),
    *_trt("h200", 1, "llama-3.1-8b", "fp8", {
        (128, 2048): 26221, (1000, 1000): 17744, (2048, 128): 3538, (2048, 2048): 12194, (5000, 500): 3902}),
    *_trt("h200", 1, "llama-3.3-70b", "fp8", {
        (128, 128): 3803, (128, 2048): 4336, (1000, 1000): 2909, (2048, 128): 442, (2048, 2048): 2003,
        (5000, 500): 566, (20000, 2000): 283}, fit={(1000, 1000)}),
    *_trt("h100", 2, "llama-3.3-70b", "fp8", {
        (128, 128): 6378, (128, 2048): 6651, (1000, 1000): 4205, (2048, 128): 762, (2048, 2048): 3082,
        (5000, 500): 898}, tp=2),
    *_trt("h100", 8, "llama-3.1-405b", "fp8", {(128, 2048): 4340, (1000, 1000): 2919, (2048, 128): 453}, tp=8),
    *_trt("h200", 8, "llama-3.1-405b", "fp8", {(1000, 1000): 3330, (2048, 2048): 2948}, tp=8),
    # mixture of experts with attention DP + expert parallel ("DEP"), per-GPU figures x GPUs
    *[Point(hw, n, "qwen3-235b-a22b", dt, "offline", v * n, "trtllm-1.2", input_len=i, output_len=o, tp=n, ep=n,
            attn_dp=True, batch=2048, mem_fraction=0.93, num_requests={1000: 3000, 1024: 1500, 8192: 1500}[i])
      for hw, n, dt, i, o, v in (("h200", 4, "fp8", 1000, 1000, 3288), ("h200", 4, "fp8", 8192, 1024, 627),
                                 ("h200", 4, "fp8", 1024, 8192, 1417), ("h100", 8, "fp8", 1000, 1000, 1932),
                                 ("h100", 8, "fp8", 1024, 8192, 873), ("b200", 4, "fp4", 1000, 1000, 5764),
                                 ("b200", 4, "fp4", 8192, 1024, 1410))],
    Point("h100", 1, "llama-2-7b", "fp8", "ttft", 7, "trtllm-0.6", input_len=128, stack="trtllm-0.5", use="fit",
          note="v0.5 batch-1 first token"),
    Point("h100", 1, "llama-2-7b", "fp8", "ttft", 36, "trtllm-0.6", input_len=2048, stack="trtllm-0.5",
          note="v0.5 batch-1 first token"),
    Point("h100", 4, "llama-2-70b", "fp8", "ttft", 109, "trtllm-0.6", input_len=2048, tp=4, stack="trtllm-0.5",
          note="v0.5 batch-1 first token"),
    Point("h100", 4, "llama-2-70b", "fp8", "ttft", 26, "trtllm-0.6", input_len=128, tp=4, stack="trtllm-0.5",
          note="v0.5 batch-1 first token"),
    # Falcon-180B at TP8 pins the 2023 engine's fixed cost per all-reduce (one per layer: parallel attention)
    Point("h100", 8, "falcon-180b", "fp8", "ttft", 27, "trtllm-0.6", input_len=128, tp=8, stack="trtllm-0.5",
          use="fit", note="v0.5 batch-1 first token"),
    Point("h100", 8, "falcon-180b", "fp8", "ttft", 205, "trtllm-0.6", input_len=2048, tp=8, stack="trtllm-0.5",
          note="v0.5 batch-1 first token"),
    Point("h200", 1, "llama-2-70b", "fp8", "offline", 4488, "mlperf-4.1", input_len=294, output_len=294,
          batch=1024, note="1 x H200"),
    Point("h100", 8, "llama-2-70b", "fp8", "offline", 24525, "mlperf-4.1", input_len=294, output_len=294,
          batch=1024, tp=2, note="8 x H100 SXM as 4 x TP2 (approx.)"),
    Point("h100", 1, "llama-3.1-8b", "fp8", "single", 242, "artificial-analysis",
          note="best H100 cloud provider, taken as FP8 on one H100 (stack unknown)"),
    *_TRT_SWEEPS,
    # ---- Blackwell, TensorRT-LLM, FP4 ----------------------------------------------------------------
    *_trt("b200", 1, "llama-3.3-70b", "fp4", {
        (128, 128): 11147, (128, 2048): 9922, (128, 4096): 6831, (1000, 1000): 7007, (2048, 128): 1339,
        (2048, 2048): 4783, (5000, 500): 1459, (20000, 2000): 665}, fit={(128, 2048), (2048, 128)}),
    *_trt("gb200", 1, "llama-3.3-70b", "fp4", {
        (128, 2048): 11309, (1000, 1000): 7326, (2048, 128): 1450, (2048, 2048): 5646, (5000, 500): 1602}),
    *_trt("b200", 4, "llama-3.1-405b", "fp4", {(128, 2048): 8020, (1000, 1000): 5209, (2048, 128): 749}, tp=4),
    Point("b200", 1, "llama-2-70b", "fp4", "offline", 11264, "mlperf-4.1", input_len=294, output_len=294,
          batch=1024, note="v4.1 preview, 1 x B200"),
    # ---- Ampere, TensorRT-LLM (static batches), FP16 ------------------------------------------------
    Point("a100", 1, "llama-2-7b", "bf16", "batch", 5586, "trtllm-0.6", input_len=128, output_len=128, batch=384),
    Point("a100", 1, "llama-2-7b", "bf16", "batch", 1928, "trtllm-0.6", input_len=128, output_len=2048, batch=60,
          use="fit"),
    Point("a100", 1, "llama-2-7b", "bf16", "batch", 591, "trtllm-0.6", input_len=2048, output_len=128, batch=52),
    Point("a100", 1, "llama-2-7b", "bf16", "ttft", 133, "trtllm-0.6", input_len=2048, use="fit",
          note="v0.5 batch-1 first token"),
    Point("a100", 1, "llama-2-7b", "bf16", "ttft", 16, "trtllm-0.6", input_len=128, use="fit", note="v0.5"),
    Point("a100", 8, "falcon-180b", "bf16", "ttft", 61, "trtllm-0.6", input_len=128, tp=8, use="fit", note="v0.5"),
    Point("a100", 8, "falcon-180b", "bf16", "ttft", 509, "trtllm-0.6", input_len=2048, tp=8, note="v0.5"),
    Point("a100", 4, "llama-2-70b", "bf16", "ttft", 377, "trtllm-0.6", input_len=2048, tp=4, note="v0.5"),
    Point("a100", 4, "llama-2-70b", "bf16", "ttft", 47, "trtllm-0.6", input_len=128, tp=4, note="v0.5"),
    # ---- MI300-class, vLLM ----------------------------------------------------------------------------
    *[Point("mi300x", 8, "llama-3.1-405b", "fp8", "batch", v, "oracle-mi300x", input_len=128, output_len=128,
            batch=b, tp=8, max_tokens=32768, use="fit" if b == 1 else "check", mem_fraction=0.9)
      for b, v in ((1, 36), (16, 468), (64, 1184), (256, 1846))],
    Point("mi300x", 8, "llama-3.1-405b", "fp8", "offline", 1993, "oracle-mi300x", input_len=128, output_len=128,
          batch=256, tp=8, num_requests=1000, use="fit", mem_fraction=0.9, note="benchmark_throughput"),
    Point("mi300x", 8, "llama-3.1-405b", "fp8", "offline", 2794, "oracle-mi300x", input_len=128, output_len=2048,
          batch=256, tp=8, num_requests=1000, mem_fraction=0.9, note="benchmark_throughput"),
    # AMD's MLPerf submission runs its own tuned vLLM branch (stack "mlperf"), not the public vLLM of
    # the Oracle blog: fitted on the one-GPU entry, checked on the eight-GPU one
    Point("mi300x", 1, "llama-2-70b", "fp8", "offline", 3062.7, "mlperf-4.1", input_len=294, output_len=294,
          batch=1024, tp=1, stack="mlperf", use="fit", note="1 x MI300X (2 x EPYC 9374F host), AMD's submission"),
    Point("mi300x", 8, "llama-2-70b", "fp8", "offline", 23514.8, "mlperf-4.1", input_len=294, output_len=294,
          batch=1024, tp=1, stack="mlperf", note="8 x MI300X (2 x EPYC 9374F host) as 8 x TP1, AMD's submission"),
    # ---- Trainium2, Neuron ------------------------------------------------------------------------------
    Point("trn2", 16, "llama-3.3-70b", "bf16", "itl", 19.83, "neuron-trn2", context=10750, tp=16, use="fit",
          note="ITL p50 without speculation"),
    Point("trn2", 16, "llama-3.3-70b", "bf16", "ttft", 575.7, "neuron-trn2", input_len=10000, tp=16,
          note="TTFT p50 of a 10,000-token prompt"),
    # ---- TPU, JetStream ---------------------------------------------------------------------------------
    Point("tpu-v5e", 8, "llama-3.1-8b", "bf16", "offline", 8249, "jetstream", input_len=1024, output_len=1024,
          batch=128, tp=8, num_requests=1000, use="fit", note="Llama-3-8B (same shapes), bf16, batch 128"),
    Point("tpu-v5e", 8, "llama-3.1-8b", "int8", "offline", 10873, "jetstream", input_len=1024, output_len=1024,
          batch=256, tp=8, num_requests=1000, note="int8, batch 256"),
    # ---- wafer-scale and LPU: single streams --------------------------------------------------------
    Point("cs3", None, "llama-3.1-8b", "bf16", "single", 1800, "cerebras", use="fit"),
    Point("cs3", None, "llama-3.1-70b", "bf16", "single", 450, "cerebras", note="70B on 4 CS-3"),
    Point("cs3", None, "llama-3.1-70b", "bf16", "single", 2100, "cerebras-2024-10", stack="cerebras-2024-10",
          use="fit", note="October software"),
    Point("cs3", None, "llama-3.1-405b", "bf16", "single", 969, "cerebras-2024-11", stack="cerebras-2024-10",
          note="Nov 2024"),
    Point("groq-lpu", None, "llama-3.1-8b", "int8", "single", 751, "artificial-analysis", use="fit"),
    Point("groq-lpu", None, "llama-3.1-70b", "int8", "single", 250, "artificial-analysis"),
]


def family_key(p: Point) -> str:
    from splitserve.sim.families import DEFAULT_STACK

    fam = get_hardware(p.hardware).family
    return f"{fam}/{p.stack or DEFAULT_STACK[fam]}"


def deployment_for(p: Point, family: FamilyParams | None = None, max_model_len: int | None = None):
    from splitserve.sim.deploy import default_kv_dtype, plan_pool
    from splitserve.sim.simulator import SimConfig

    hw, model = get_hardware(p.hardware), get_model(p.model)
    if p.mem_fraction is not None:
        hw = replace(hw, memory_usable=p.mem_fraction)
    need = max(2048, p.input_len + p.output_len + 16, p.context + 16)
    cfg = SimConfig(max_model_len=min(max_model_len or max(need, 8192), model.max_context))
    plan = plan_pool(hw, model, units=p.units, weight_dtype=p.weight_dtype,
                     kv_dtype=default_kv_dtype(p.weight_dtype), cfg=cfg, tp=p.tp,
                     pp=1 if p.tp is not None else None, ep=p.ep, attn_dp=p.attn_dp)
    d = plan.deployment
    d = replace(d, family=family or get_family(hw.family, p.stack))
    return d, plan.replicas


def predict(p: Point, family: FamilyParams | None = None, num_requests: int | None = None) -> float:
    """The simulator's figure for a published point, in the point's unit."""
    from splitserve.sim.cost import StepCost

    d, replicas = deployment_for(p, family)
    c = StepCost(d)
    if p.kind == "single":
        return c.single_stream_tok_s(p.context)
    if p.kind == "itl":
        return c.decode_step(1, p.context) * 1e3
    if p.kind == "ttft":
        return (c.request_overhead_s + c.prefill_time(p.input_len, chunk=max(p.max_tokens, p.input_len))) * 1e3
    n = p.batch if p.kind == "batch" else (num_requests or p.num_requests or 1500)
    tokens = max(p.max_tokens, p.batch * p.input_len) if p.kind == "batch" else p.max_tokens
    batch = p.batch
    if family_key(p).split("/", 1)[1].startswith("trtllm"):  # (per sequence: attention DP seats per rank)
        # TensorRT-LLM's default capacity policy (GUARANTEED_NO_EVICT) admits a request only when
        # its whole prompt + output fits the KV cache: never preempts, unlike vLLM's scheduler.
        # By stack, not by source: NVIDIA's MLPerf submissions run TensorRT-LLM too.
        batch = min(batch, max(1, d.kv_capacity_tokens // (p.input_len + p.output_len)))
    return offline_throughput(d, replace(p, batch=batch), n, tokens) * replicas


def offline_throughput(d, p: Point, num_requests: int, max_tokens: int) -> float:
    """Every request queued at t=0 on one replica; output tokens/s over the whole run."""
    from splitserve.bench import workloads as wl
    from splitserve.sim.cost import StepCost
    from splitserve.sim.simulator import PoolSpec, SimConfig, Simulation

    max_len = p.input_len + p.output_len + 16
    cfg = SimConfig(max_num_seqs=p.batch, max_num_batched_tokens=max_tokens, max_model_len=max_len,
                    record_itl=False, max_waiting=10**7, enable_prefix_caching=False)
    blocks = d.kv_capacity_tokens // cfg.block_size
    pool = PoolSpec("both", 1, blocks, StepCost(d), kv_bytes_per_token=d.kv_bytes_per_token,
                    num_layers=d.model.num_layers)
    sim = Simulation(cfg, [pool])
    specs = wl.synthetic(input_len=p.input_len, output_len=p.output_len, num_requests=num_requests,
                         arrival=wl.Arrival(float("inf")), seed=0)
    sink = sim.run(specs)
    return sink.builder.out_tokens / max(sink.builder.last_end - sink.builder.first_start, 1e-12)


def log_error(p: Point, got: float) -> float:
    return math.log(got / p.value)


def table(points: list[Point] | None = None, out=sys.stdout) -> dict[str, list[float]]:
    """Prints every point with its prediction; returns the unfitted checks' log errors per family."""
    errs: dict[str, list[float]] = {}
    print("| family/stack | use | hardware | model | dtype | setup | published | simulated | error | source |",
          file=out)
    print("|---|---|---|---|---|---|---:|---:|---:|---|", file=out)
    for p in points or POINTS:
        got = predict(p)
        e = log_error(p, got)
        key = family_key(p)
        if p.use == "check":
            errs.setdefault(key, []).append(e)
        setup = _setup(p)
        unit = "ms" if p.kind in ("itl", "ttft") else "tok/s"
        print(f"| {key} | {p.use} | {p.units or ''} x {p.hardware} | {p.model} | {p.weight_dtype} | {setup} | "
              f"{p.value:,.4g} {unit} | {got:,.4g} | {math.exp(e) - 1:+.0%} | {p.source} |", file=out, flush=True)
    return errs


def _setup(p: Point) -> str:
    tp = f"TP{p.tp} " if p.tp else ""
    tp += f"EP{p.ep} " if p.ep else ""
    tp += "attention-DP " if p.attn_dp else ""
    if p.kind == "single":
        return f"{tp}one stream"
    if p.kind == "itl":
        return f"{tp}batch-1 ITL at {p.context} ctx"
    if p.kind == "ttft":
        return f"{tp}TTFT of {p.input_len} tokens"
    if p.kind == "batch":
        return f"{tp}static batch {p.batch}, {p.input_len}/{p.output_len}"
    return f"{tp}offline {p.input_len}/{p.output_len}"


def summary(errs: dict[str, list[float]], out=sys.stdout) -> None:
    allv = [abs(e) for v in errs.values() for e in v]
    print("\n| family/stack | unfitted checks | median abs log error | worst ratio |", file=out)
    print("|---|---:|---:|---:|", file=out)
    for k, v in sorted(errs.items()):
        worst = max(v, key=abs)
        print(f"| {k} | {len(v)} | {statistics.median(abs(e) for e in v):.3f} | {math.exp(worst):.2f}x |", file=out)
    if allv:
        print(f"\nall {len(allv)} unfitted checks over {len(errs)} families: median |log(pred/pub)| "
              f"{statistics.median(allv):.3f}, worst {math.exp(max(allv)):.2f}x", file=out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--fit"]:
        from splitserve.sim.fitting import fit_main

        fit_main(argv[1:])
        return
    only = argv[0] if argv else None
    pts = [p for p in POINTS if only is None or family_key(p).startswith(only)]
    summary(table(pts))


if __name__ == "__main__":
    main()
