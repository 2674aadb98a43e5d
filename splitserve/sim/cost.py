"""Step-time cost model: how long one scheduler step takes on a replica, from the plan alone.

A step computes `T` tokens (decode tokens and prefill chunks together), samples `S` of them,
scores `A` (query, key) pairs in attention and reads `K` tokens of KV cache. Per layer:

    t_layer = max(FLOPs / (peak * eff_compute), bytes / (bandwidth * eff_mem)) + layer_floor

summed over the layers (one tensor-parallel shard each), plus the LM head, plus tensor-parallel
all-reduces (two per layer), pipeline hops between stages, and a per-step floor. Bytes are the
weights read once per step (for MoE: the experts the batch actually touches), the KV read and
written, and activations are neglected. `eff_*` and the floors are *family* parameters,
calibrated once per hardware family from the published measurements listed in FAMILIES, never
per model.

Why floors: a pure roofline says one CS-3 decodes Llama-3.1-8B at 16-bit in 0.8 us per token
(16 GB / 21 PB/s), i.e. over a million tokens/s for one stream. Measured: 1,800 tok/s. A single
stream on a wafer or an LPU is bound by latency, not bandwidth: each layer's activations must
cross the fabric (or hop to the next chip), be broadcast to the cores holding the layer's weight
slices and reduced back, and the next layer cannot start before that. The floor is that
per-layer traversal time; it is the only term that matters for one stream there, and the
roofline terms take over only at large batches. GPUs have a floor too (kernel launches, small
matmul tails, synchronisation), which is why a GPU never reaches its bandwidth roofline at
batch 1 either.

`local-cpu` uses a direct linear fit of the real engine's measured step times
(`splitserve simulate calibrate`), see calibration.py.
"""

from __future__ import annotations

from typing import Any

import math
from dataclasses import dataclass, field

from splitserve.sim.hardware import LINKS, Hardware, Link
from splitserve.sim.models import COMPUTE_DTYPE, ModelSpec, dtype_bytes

ACT_BYTES = 2.0  # activations travel in 16-bit


@dataclass(frozen=True)
class FamilyParams:
    eff_compute: float  # fraction of peak FLOP/s reached by large matmuls
    eff_mem: float  # fraction of peak bandwidth reached streaming weights and KV
    layer_floor_s: float  # latency floor per layer per step
    step_floor_s: float  # per-step overhead: scheduling, sampling, host round trip
    source: str


# Calibrated once per family. The derivations are reproduced by tests/sim/test_calibration.py
# (splitserve.sim.published.fit_family) and documented in docs/simulator.md.
FAMILIES: dict[str, FamilyParams] = {
    # GPUs. eff_mem = 0.623: best H100 cloud Llama-3.1-8B single stream, 242 tok/s (Artificial
    # Analysis, 2024; taken as FP8 weights on one H100 SXM: 16-bit cannot exceed 209 tok/s) with
    # the floors below. eff_compute = 0.754: MLPerf Inference v4.1, one H200, Llama-2-70B offline
    # 4,488 tok/s (FP8 weights and KV), simulated with 294-in/294-out requests at batch 1,024. Floors: assumptions (CUDA-graph launch + small-kernel tails ~8 us
    # per layer; scheduling + sampling ~250 us per step, as in vLLM/TRT-LLM profiles).
    "gpu": FamilyParams(0.754, 0.623, 8e-6, 250e-6,
                        "H100 Llama-3.1-8B 242 tok/s single stream; MLPerf v4.1 H200 Llama-2-70B 4,488 tok/s"),
    # TPUs and Trainium: HBM accelerators with the same roofline structure; no calibration point
    # of their own is used (they are validation targets), so they take the GPU family's values
    # with a larger per-step floor for the XLA/Neuron host loop (assumption).
    "tpu": FamilyParams(0.754, 0.623, 8e-6, 400e-6, "GPU family values (HBM accelerator), step floor assumed"),
    "trainium": FamilyParams(0.754, 0.623, 8e-6, 400e-6, "GPU family values (HBM accelerator), step floor assumed"),
    # Cerebras CS-3: Llama-3.1-8B at 16-bit, 1,800 output tok/s single stream (Cerebras Inference
    # launch, Aug 2024) -> 17 us per layer traversal of the wafer with a 20 us step floor. The
    # efficiencies are assumptions (they only matter at batch sizes where the floor stops dominating).
    "wafer": FamilyParams(0.30, 0.50, 16.7e-6, 20e-6, "Cerebras Llama-3.1-8B 1,800 tok/s single stream (16-bit)"),
    # Groq LPU: Llama-3.1-8B at 8-bit, 751 tok/s (Artificial Analysis, 2024) -> ~35 us per layer
    # (the deterministic pipeline's per-layer compute and chip-to-chip hand-off; the replica is
    # TP2 x PP32, whose explicit hops and all-reduces come on top), 20 us step floor.
    "lpu": FamilyParams(0.30, 0.50, 34.9e-6, 20e-6, "Groq Llama-3.1-8B 751 tok/s (8-bit)"),
    # local-cpu is not a roofline: see calibration.py. These values only serve models other than
    # the calibrated one when no calibration file is found.
    "cpu": FamilyParams(0.30, 0.50, 30e-6, 1e-3, "fallback; run `splitserve simulate calibrate`"),
}


@dataclass
class Deployment:
    """One replica's shape: `tp * pp` units of `hardware` serving `model`."""

    hardware: Hardware
    model: ModelSpec
    weight_dtype: str
    kv_dtype: str
    tp: int = 1
    pp: int = 1
    family: FamilyParams | None = None
    tp_link: Link | None = None  # scale-up link (tensor parallel)
    pp_link: Link | None = None  # between pipeline stages
    calibration: Any = None  # local-cpu: a Calibration

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = FAMILIES[self.hardware.family]
        if self.tp_link is None:
            self.tp_link = LINKS[self.hardware.scale_up]
        if self.pp_link is None:
            self.pp_link = LINKS[self.hardware.scale_up if self.units <= self.hardware.scale_up_size
                                 else self.hardware.scale_out]

    @property
    def units(self) -> int:
        return self.tp * self.pp

    @property
    def kv_bytes_per_token(self) -> float:
        return self.model.kv_bytes_per_token(self.kv_dtype)

    @property
    def weight_bytes(self) -> float:
        return self.model.weight_bytes(self.weight_dtype)

    @property
    def memory_bytes(self) -> float:
        return self.units * self.hardware.memory_bytes * self.hardware.memory_usable

    @property
    def kv_capacity_tokens(self) -> int:
        return max(0, int((self.memory_bytes - self.weight_bytes) // self.kv_bytes_per_token))

    def describe(self) -> str:
        par = f"TP{self.tp}" + (f" x PP{self.pp}" if self.pp > 1 else "")
        return (f"{self.units} x {self.hardware.name} ({par}), {self.model.name} "
                f"{self.weight_dtype} weights, {self.kv_dtype} KV")


@dataclass
class StepCost:
    """Compiled per-deployment constants: `time(T, S, A, K, B)` is a handful of float operations,
    called once per simulated step."""

    deployment: Deployment
    _c: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = self.deployment
        m, hw, fam = d.model, d.hardware, d.family
        tp = d.tp
        wb = dtype_bytes(d.weight_dtype)
        peak = hw.peak_flops(COMPUTE_DTYPE.get(d.weight_dtype.lower(), "bf16")) * fam.eff_compute
        bw = hw.mem_bandwidth * fam.eff_mem
        self.peak, self.bw = peak, bw
        # FLOPs per computed token in the layers (active parameters), per (q, k) pair, per sample.
        self.f_tok = 2.0 * m.layer_params(active=True) / (tp * peak)
        self.f_pair = m.attn_flops_per_pair() / (tp * peak)
        self.f_head = 2.0 * m.lm_head_params / (tp * peak)
        # Bytes: dense part of the layers always read; experts: the ones the batch touches.
        dense_layer_params = m.layer_params(active=False)
        if m.is_moe:
            dense_layer_params -= m.num_moe_layers * m.num_experts * m.expert_params
        self.m_dense = dense_layer_params * wb / (tp * bw)
        self.moe = m.is_moe
        if m.is_moe:
            self.m_all_experts = m.num_moe_layers * m.num_experts * m.expert_params * wb / (tp * bw)
            self.expert_miss = 1.0 - m.experts_per_token / m.num_experts  # P(a token skips an expert)
        self.m_kv = d.kv_bytes_per_token / (tp * bw)
        self.m_head = m.lm_head_params * wb / (tp * bw)
        self.floor = m.num_layers * fam.layer_floor_s + fam.step_floor_s
        # Tensor parallel: two all-reduces of T x hidden activations per layer (ring).
        act = m.hidden_size * ACT_BYTES
        if tp > 1:
            link = d.tp_link
            self.tp_lat = 2 * m.num_layers * link.latency_s
            self.tp_tok = 2 * m.num_layers * 2 * (tp - 1) / tp * act / link.bandwidth
        else:
            self.tp_lat = self.tp_tok = 0.0
        if d.pp > 1:
            self.pp_lat = (d.pp - 1) * d.pp_link.latency_s
            self.pp_tok = (d.pp - 1) * act / d.pp_link.bandwidth
        else:
            self.pp_lat = self.pp_tok = 0.0
        self.cal = d.calibration

    def time(self, T: int, S: int, A: int, K: int, B: int, P: int = 0) -> float:
        """Seconds for a step computing T tokens of B sequences (P of them prefill chunks),
        sampling S, with A attention pairs and K KV tokens read."""
        if self.cal is not None:
            return self.cal.step_time(T, S, A, K, B, P)
        compute = T * self.f_tok + A * self.f_pair
        if self.moe:
            mem = self.m_dense + self.m_all_experts * (1.0 - self.expert_miss ** T) + (K + T) * self.m_kv
        else:
            mem = self.m_dense + (K + T) * self.m_kv
        t = compute if compute > mem else mem
        if S:
            hc, hm = S * self.f_head, self.m_head
            t += hc if hc > hm else hm
        return t + self.floor + self.tp_lat + T * self.tp_tok + self.pp_lat + T * self.pp_tok

    # ---- analytic helpers (planning, docs, tests) ----------------------------------------------
    def decode_step(self, batch: int, context: int) -> float:
        """One decode step of `batch` sequences each with `context` tokens already cached."""
        return self.time(batch, batch, batch * (context + 1), batch * (context + 1), batch)

    def prefill_time(self, prompt: int, chunk: int = 1 << 30) -> float:
        """A lone prompt, prefilled in chunks of `chunk` tokens, until its first token."""
        t, done = 0.0, 0
        while done < prompt:
            n = min(chunk, prompt - done)
            pairs = n * done + n * (n + 1) // 2
            t += self.time(n, 1 if done + n == prompt else 0, pairs, done + n, 1, 1 if n > 1 else 0)
            done += n
        return t

    def single_stream_tok_s(self, context: int = 1024) -> float:
        return 1.0 / self.decode_step(1, context)


def ceil_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
