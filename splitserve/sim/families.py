"""Step-cost terms per hardware family and software stack, each fitted to published measurements
of that family and stack (splitserve/sim/published.py lists every point, fitted and checked;
`python -m splitserve.sim.published` re-derives the fits and prints the error table).

A family shares silicon generation and memory system (Hopper: H100, H200, H200 NVL); a stack is
the serving software whose kernels and scheduling the terms absorb (TensorRT-LLM, vLLM, Neuron,
JetStream). A family with no published measurement found for a stack borrows another's terms
and says so (`calibrated=False`): `splitserve hardware` prints which.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyParams:
    eff_compute: float  # fraction of peak FLOP/s reached by large matmuls
    eff_mem: float  # fraction of peak bandwidth reached streaming weights and KV
    layer_floor_s: float  # latency floor per layer per step
    step_floor_s: float  # per-step overhead: scheduling, sampling, host round trip
    source: str
    # A matmul with few rows (tokens in the step) runs below eff_compute: at T tokens it reaches
    # eff_compute * T / (T + gemm_half_tokens), i.e. it costs gemm_half_tokens extra tokens' worth.
    gemm_half_tokens: float = 0.0
    # Compute and memory time overlap imperfectly: a step takes (c^p + m^p)^(1/p); 0 = max(c, m).
    overlap: float = 0.0
    eff_compute_fp4: float | None = None  # FP4 matmuls, where they differ from eff_compute
    request_overhead_s: float = 0.0  # before a request's first step (API, tokenizer, engine set-up)
    # > 0: the per-layer floor scales with sqrt(weights per layer / this many parameters). On a 2-D
    # mesh (the wafer) a layer's weights fill a region of cores in proportion to their size, and
    # each step broadcasts the activations across it and reduces back: a distance of its side.
    layer_floor_ref_params: float = 0.0
    collective_latency_s: float = 0.0  # the stack's fixed cost per tensor-parallel collective, on top of the link's
    # Per sequence in a step, on a replica of more than one unit (TP > 1): a cost that does not shrink
    # with the ranks (each rank's host work per sequence and the ranks' agreement on the batch every
    # step). Fitted where a stack has multi-GPU fit points (TensorRT-LLM's v0.19 TP sweeps).
    tp_seq_overhead_s: float = 0.0
    calibrated: bool = True  # False: terms borrowed from another family or stack (see source)
    expected_error: str = ""  # on the unfitted checks (published.py's table)


# Shape terms shared by the HBM accelerators, fitted with the Hopper TensorRT-LLM terms (rows from
# 128/128 to 2048/128): a small matmul ramp (13 tokens) and a nearly sharp overlap (p = 16, the
# fit's bound: these rows want max(compute, memory), with compute at 44% of the FP8 peak).
_HALF, _P = 13.3, 16.0
_UNKNOWN = "unknown: no published measurement of this stack was used"
_LLAMA8B_LAYER = 218_103_808  # Llama-3.1-8B: parameters per layer


def _tp_sweep(dtype: str, chip: str) -> str:
    """Where a current TensorRT-LLM stack's multi-GPU term comes from (published.py _TRT_SWEEPS)."""
    return (f"; the cost per sequence per step at TP > 1 from v0.19's TP sweep of Llama-3.3-70B {dtype} on 2, 4 "
            f"and 8 {chip} (128/2048, 2048/128)")


def _hbm(eff_compute: float, eff_mem: float, step_floor_s: float, source: str, **kw) -> FamilyParams:
    """An HBM accelerator's terms: the shared shape terms and a 4 us per-layer floor (assumed)."""
    return FamilyParams(eff_compute, eff_mem, 4e-6, step_floor_s, source, gemm_half_tokens=_HALF, overlap=_P, **kw)


FAMILIES: dict[str, FamilyParams] = {
    "hopper/trtllm": _hbm(
        0.442, 0.711, 226e-6,
        "TensorRT-LLM v1.0 perf-overview (trtllm-bench, PyTorch backend, 2025): Llama-3.1-8B FP8 on one "
        "H100 at ISL/OSL 128/128, 2048/128, 128/2048; Llama-3.3-70B FP8 on one H200 at 1000/1000"
        + _tp_sweep("FP8", "H200"),
        tp_seq_overhead_s=16.9e-6,
        expected_error="median 13% (|log| 0.126) on 37 unfitted checks; worst 0.70x (MLPerf v4.1 H200, the 1,000 W "
                       "part) and 1.35x (Qwen3-235B attention-DP at 1024/8192)"),
    "hopper/trtllm-0.5": _hbm(
        0.442, 0.711, 226e-6,
        "TensorRT-LLM v0.5 batch-1 first-token latency (static engine, 2023): the v1.0 terms plus a fixed "
        "per-request overhead fitted to Llama-2-7B FP8 on one H100, 128 tokens, 7 ms, and a latency per all-reduce "
        "message fitted to Falcon-180B at TP8, 128 tokens, 27 ms", request_overhead_s=3.81e-3,
        collective_latency_s=10.7e-6,
        expected_error="median 8% (|log| 0.080) on 4 unfitted checks; worst 0.69x (Falcon-180B TP8, 2,048 tokens)"),
    "hopper/vllm": _hbm(
        0.442, 0.711, 226e-6,
        "no vLLM-on-Hopper measurement with a fixed workload found: TensorRT-LLM terms (uncalibrated)",
        calibrated=False, expected_error=_UNKNOWN),
    "blackwell/trtllm": _hbm(
        0.442, 0.397, 226e-6,
        "TensorRT-LLM v1.0 perf-overview (2025): Llama-3.3-70B FP4 on one B200 at 128/2048 and 2048/128 "
        "(FP4 fitted; FP8/BF16 on Blackwell: no measurement found, Hopper's efficiency used)"
        + _tp_sweep("FP4", "B200"),
        eff_compute_fp4=0.375, tp_seq_overhead_s=20.5e-6,
        expected_error="median 8% (|log| 0.074) on 17 unfitted FP4 checks; worst 0.70x (GB200, 2048/2048) and 1.21x "
                       "(405B TP4, 128/2048)"),
    "ampere/trtllm": _hbm(
        0.711, 1.0, 226e-6,
        "TensorRT-LLM v0.6.1 performance.md (late 2023): Llama-2-7B FP16 on one A100 (static batch), "
        "128/2048 at batch 60 and (v0.5) first-token latency at 128 and 2048 tokens (eff_mem at its bound, 1.0: "
        "the published figure needs the full datasheet bandwidth for the bytes modelled), and a latency per "
        "all-reduce message from Falcon-180B at TP8, 128 tokens, 61 ms", request_overhead_s=7.24e-3,
        collective_latency_s=20.0e-6,
        expected_error="median 7% (|log| 0.065) on 5 unfitted checks; worst 1.39x (static batch 384, 128/128)"),
    # DistServe's testbed (OSDI 2024): its own engine and the vLLM of late 2023 on A100-80GB, far
    # below TensorRT-LLM's efficiency. Fitted by splitserve.sim.repro.fit_distserve() to the two
    # single-phase rates of DistServe's Figure 1 only (prefill-only 5.6, decode-only 10 req/s).
    "ampere/distserve": _hbm(
        0.411, 0.493, 226e-6,
        "DistServe (OSDI 2024) Figure 1: OPT-13B on one A100-80GB, 512 in / 64 out; compute efficiency "
        "from the prefill-only instance's 5.6 req/s at P90 TTFT <= 0.4 s, bandwidth efficiency from the "
        "decode-only instance's 10 req/s at P90 TPOT <= 0.04 s (splitserve.sim.repro.fit_distserve)",
        expected_error="checks: the colocated and 2P1D rates of the same figure, 1.20x and 1.00x "
                       "(tests/sim/test_published_disagg.py)"),
    "mi300/vllm": _hbm(
        0.184, 0.365, 226e-6,
        "Oracle OCI blog, 10 Oct 2024: Llama-3.1-405B FP8 on 8 x MI300X with vLLM (benchmark_latency 128/128 "
        "at batch 1; benchmark_throughput 128/128)",
        expected_error="median 14% (|log| 0.128) on 4 unfitted checks; worst 1.29x (128/2048)"),
    "mi300/mlperf": _hbm(
        0.325, 0.365, 226e-6,
        "AMD's MLPerf Inference v4.1 submission (its tuned vLLM branch, FP8 weights and KV): Llama-2-70B offline "
        "on one MI300X, 3,063 tok/s (compute efficiency fitted; bandwidth efficiency as mi300/vllm)",
        expected_error="one unfitted check, the eight-GPU entry of the same submission (same software, 8 replicas): "
                       "1.04x"),
    "mi300/sglang": _hbm(
        0.184, 0.365, 226e-6,
        "no SGLang-on-MI300 measurement with a fixed workload found: vLLM terms (uncalibrated)",
        calibrated=False, expected_error=_UNKNOWN),
    "mi355/vllm": _hbm(
        0.184, 0.365, 226e-6,
        "no MI355X measurement used: MI300 vLLM terms (uncalibrated)", calibrated=False, expected_error=_UNKNOWN),
    "trainium/neuron": _hbm(
        0.442, 0.169, 400e-6,
        "AWS Neuron SDK tutorial 'Speculative decoding ... Llama-3.3-70B on Trn2' (NxD Inference + vLLM): "
        "batch 1, 10,000 in / 1,500 out, TP64 (16 chips), ITL p50 19.8 ms",
        expected_error="one unfitted check: TTFT of 10,000 tokens 0.73x (27% fast)"),
    "tpu/jetstream": _hbm(
        0.442, 0.589, 400e-6,
        "JetStream MaxText benchmark table (2024-04-24): Llama-3-8B bf16 on TPU v5e-8, batch 128, "
        "1024 in / 1024 out, 8,249 tok/s",
        expected_error="one unfitted check: int8 at batch 256, 1.41x (optimistic)"),
    "rdu/samba": _hbm(
        0.442, 0.711, 400e-6,
        "no SN40L measurement found: Hopper TensorRT-LLM terms (uncalibrated)",
        calibrated=False, expected_error=_UNKNOWN),
    # Cerebras CS-3: the per-layer traversal of the wafer, growing with the side of a layer's region
    # (sqrt of its weights; Llama-3.1-8B's 218M parameters per layer is the reference). The
    # efficiencies are assumptions (they only matter at batch sizes where the floor stops dominating).
    # Two software releases: the launch (Aug 2024) and the one that made 70B 4.7x faster (Oct 2024).
    "wafer/cerebras": FamilyParams(
        0.30, 0.50, 16.7e-6, 20e-6, "Cerebras Inference launch, 27 Aug 2024: Llama-3.1-8B 16-bit, 1,800 tok/s "
        "single stream (efficiencies assumed)", layer_floor_ref_params=_LLAMA8B_LAYER,
        expected_error="one unfitted check: Llama-3.1-70B on 4 systems (launch), 0.82x"),
    "wafer/cerebras-2024-10": FamilyParams(
        0.30, 0.50, 2.594e-6, 20e-6, "Cerebras, 24 Oct 2024: Llama-3.1-70B 16-bit, 2,100 tok/s single stream on "
        "the October software (efficiencies assumed)", layer_floor_ref_params=_LLAMA8B_LAYER,
        expected_error="one unfitted check: Llama-3.1-405B (Nov 2024), 0.67x"),
    # Groq LPU: Llama-3.1-8B at 8-bit, 751 tok/s (Artificial Analysis, 2024) -> ~35 us per layer.
    "lpu/groq": FamilyParams(
        0.30, 0.50, 34.9e-6, 20e-6, "Artificial Analysis, 2024: Groq Llama-3.1-8B (8-bit), 751 tok/s single "
        "stream (efficiencies assumed)",
        expected_error="one unfitted check: Llama-3.1-70B 1.17x"),
    # local-cpu is not a roofline: see calibration.py. These values only serve models other than
    # the calibrated one when no calibration file is found.
    "cpu/splitserve": FamilyParams(
        0.30, 0.50, 30e-6, 1e-3, "fallback; run `splitserve simulate calibrate`", calibrated=False,
        expected_error="local-cpu with its calibration file: see `splitserve simulate calibrate` (fit error printed)"),
}

DEFAULT_STACK = {"hopper": "trtllm", "blackwell": "trtllm", "ampere": "trtllm", "mi300": "vllm",
                 "mi355": "vllm", "trainium": "neuron", "tpu": "jetstream", "rdu": "samba", "wafer": "cerebras",
                 "lpu": "groq", "cpu": "splitserve"}


def stacks_of(family: str) -> list[str]:
    return [k.split("/", 1)[1] for k in FAMILIES if k.split("/", 1)[0] == family]


def get_family(family: str, stack: str | None = None) -> FamilyParams:
    """The terms for `family` running `stack` (default: the family's calibrated stack)."""
    stack = stack or DEFAULT_STACK[family]
    key = f"{family}/{stack}"
    if key not in FAMILIES:
        raise ValueError(f"no stack {stack!r} for {family} hardware; known: {', '.join(stacks_of(family))}")
    return FAMILIES[key]
