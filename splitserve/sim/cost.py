"""Step-time cost model: how long one scheduler step takes on a replica, from the plan alone.

A step computes `T` tokens (decode tokens and prefill chunks together), samples `S` of them,
scores `A` (query, key) pairs in attention and reads `K` tokens of KV cache. Per layer:

    t_layer = pnorm(FLOPs / (peak * eff(T)), bytes / (bandwidth * eff_mem)) + layer_floor

with eff(T) = eff_compute * T / (T + gemm_half_tokens) (a step of few tokens leaves the matrix
units idle) and pnorm(c, m) = (c^p + m^p)^(1/p) (compute and memory traffic overlap imperfectly
near the ridge point; p = 0 means max), summed over the layers (one tensor-parallel shard each),
plus the LM head, plus tensor-parallel collectives (all-reduces; all-to-all for expert parallel),
pipeline hops between stages, and a per-step floor. Bytes are the
weights read once per step (for MoE: the experts the batch actually touches), the KV read and
written, and activations are neglected. `eff_*` and the floors are *family* parameters,
calibrated once per hardware family and serving stack from published measurements
(families.py, published.py), never per model.

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

from splitserve.sim.families import FAMILIES, FamilyParams, get_family
from splitserve.sim.hardware import LINKS, Hardware, Link
from splitserve.sim.models import COMPUTE_DTYPE, ModelSpec, dtype_bytes

__all__ = ["FAMILIES", "FamilyParams", "Deployment", "SpeculativeStepCost", "StepCost", "ceil_pow2"]

ACT_BYTES = 2.0  # activations travel in 16-bit


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
    stack: str | None = None  # serving software whose terms apply (default: the family's calibrated one)
    ep: int = 1  # expert parallel over the replica's TP units: experts split, all-to-all on the scale-up link
    attn_dp: bool = False  # attention data parallel: each TP rank attends its own sequences with full KV heads

    def __post_init__(self) -> None:
        if self.ep > 1 and (not self.model.is_moe or self.ep != self.tp):
            raise ValueError(f"expert parallelism needs a mixture-of-experts model and EP = TP (got EP{self.ep}, "
                             f"TP{self.tp}, {self.model.name})")
        if self.attn_dp and self.tp < 2:
            raise ValueError("attention data parallelism needs TP >= 2 (it replaces attention's tensor split)")
        if self.family is None:
            self.family = get_family(self.hardware.family, self.stack)
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
    def kv_replication(self) -> float:
        """Copies of each KV entry across the TP ranks: a model with fewer KV heads than ranks (MLA
        has one latent head) repeats its KV on every rank, unless attention runs data parallel."""
        if self.attn_dp:
            return 1.0
        heads = 1 if self.model.is_mla else self.model.num_kv_heads
        return self.tp / min(self.tp, heads)

    @property
    def attn_weight_copies_bytes(self) -> float:
        """Attention data parallel: every rank holds the whole attention weights."""
        if not self.attn_dp:
            return 0.0
        return (self.tp - 1) * self.model.num_layers * self.model.attn_params * dtype_bytes(self.weight_dtype)

    @property
    def kv_capacity_tokens(self) -> int:
        free = self.memory_bytes - self.weight_bytes - self.attn_weight_copies_bytes
        return max(0, int(free // (self.kv_bytes_per_token * self.kv_replication)))

    def describe(self) -> str:
        par = f"TP{self.tp}" + (f" x PP{self.pp}" if self.pp > 1 else "") + (f", EP{self.ep}" if self.ep > 1 else "")
        par += ", attention DP" if self.attn_dp else ""
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
        cdt = COMPUTE_DTYPE.get(d.weight_dtype.lower(), "bf16")
        eff = fam.eff_compute_fp4 if cdt == "fp4" and fam.eff_compute_fp4 and "fp4" in hw.flops else fam.eff_compute
        peak = hw.peak_flops(cdt) * eff
        bw = hw.mem_bandwidth * fam.eff_mem
        self.peak, self.bw = peak, bw
        # FLOPs per computed token in the layers (active parameters), per (q, k) pair, per sample.
        self.f_tok = 2.0 * m.layer_params(active=True) / (tp * peak)
        self.f_pair = m.attn_flops_per_pair() / (tp * peak)
        self.f_head = 2.0 * m.lm_head_params / (tp * peak)
        # A step's matmuls have T rows: at T tokens they reach T / (T + half) of their large-size
        # efficiency, i.e. cost `half` extra tokens' worth of compute.
        self.c_ramp = fam.gemm_half_tokens * self.f_tok
        self.p = fam.overlap
        self.inv_p = 1.0 / fam.overlap if fam.overlap else 0.0
        # below this ratio of the smaller to the larger term the p-norm is the larger term to 1e-12
        self.p_cut = (fam.overlap * 1e-12) ** self.inv_p if fam.overlap else 0.0
        # Bytes: dense part of the layers always read; experts: the ones the batch touches.
        dense_layer_params = m.layer_params(active=False)
        if m.is_moe:
            dense_layer_params -= m.num_moe_layers * m.num_experts * m.expert_params
        attn = m.num_layers * m.attn_params
        # attention DP: each rank reads the whole attention weights (its own sequences' attention)
        self.m_dense = ((dense_layer_params - attn) / tp + (attn if d.attn_dp else attn / tp)) * wb / bw
        self.moe = m.is_moe
        if m.is_moe:
            self.m_all_experts = m.num_moe_layers * m.num_experts * m.expert_params * wb / (tp * bw)
            self.expert_miss = 1.0 - m.experts_per_token / m.num_experts  # P(a token skips an expert)
        self.m_kv = d.kv_bytes_per_token * d.kv_replication / (tp * bw)
        self.m_head = m.lm_head_params * wb / (tp * bw)
        layer_floor = fam.layer_floor_s
        if fam.layer_floor_ref_params:  # traversal of a region that grows with the layer (families.py)
            layer_floor *= math.sqrt(m.layer_params(active=False) / m.num_layers / fam.layer_floor_ref_params)
        self.floor = m.num_layers * layer_floor + fam.step_floor_s
        # Tensor parallel: per layer an all-reduce of T x hidden activations (ring) after attention
        # (none with attention DP) and after the MLP; with expert parallelism a MoE layer instead
        # sends each token to its experts' ranks and back (all-to-all dispatch and combine).
        act = m.hidden_size * ACT_BYTES
        self.tp_lat = self.tp_tok = 0.0
        # tensor parallel: the stack's cost per sequence per step that the ranks do not share (with
        # attention data parallel each rank handles its own share of the sequences)
        self.tp_seq = (fam.tp_seq_overhead_s / (tp if d.attn_dp else 1)) if tp > 1 else 0.0
        if tp > 1:
            link = d.tp_link
            moe_a2a = m.num_moe_layers if d.ep > 1 else 0
            if m.parallel_attention:  # attention and MLP read the same input: one all-reduce of their sum
                reduces = m.num_layers - moe_a2a
            else:
                reduces = (0 if d.attn_dp else m.num_layers) + m.num_layers - moe_a2a
            # latency per collective: the link's, plus the stack's own cost per message (kernel launch,
            # synchronisation) where a stack was fitted with one (2023 engines): a ring all-reduce
            # passes 2 (tp - 1) messages in turn, an all-to-all sends its at once
            stack = fam.collective_latency_s
            self.tp_lat = (reduces * (link.latency_s + 2 * (tp - 1) * stack)
                           + 2 * moe_a2a * (link.latency_s + stack))
            self.tp_tok = (reduces * 2 * (tp - 1) / tp * act
                           + moe_a2a * 2 * m.experts_per_token * (d.ep - 1) / d.ep * act) / link.bandwidth
        if d.pp > 1:
            self.pp_lat = (d.pp - 1) * d.pp_link.latency_s
            self.pp_tok = (d.pp - 1) * act / d.pp_link.bandwidth
        else:
            self.pp_lat = self.pp_tok = 0.0
        self.cal = d.calibration
        # before a request's first step: API, tokenization, engine set-up (local-cpu: measured)
        self.request_overhead_s = self.cal.request_overhead_s if self.cal is not None else fam.request_overhead_s

    def time(self, T: int, S: int, A: int, K: int, B: int, P: int = 0) -> float:
        """Seconds for a step computing T tokens of B sequences (P of them prefill chunks),
        sampling S, with A attention pairs and K KV tokens read."""
        if self.cal is not None:
            return self.cal.step_time(T, S, A, K, B, P)
        compute = T * self.f_tok + self.c_ramp + A * self.f_pair
        if self.moe:
            mem = self.m_dense + self.m_all_experts * (1.0 - self.expert_miss ** T) + (K + T) * self.m_kv
        else:
            mem = self.m_dense + (K + T) * self.m_kv
        t, lo = (compute, mem) if compute > mem else (mem, compute)
        if lo > t * self.p_cut and self.p:  # near the ridge compute and memory overlap imperfectly
            t = (t ** self.p + lo ** self.p) ** self.inv_p
        if S:
            hc, hm = S * self.f_head, self.m_head
            t += hc if hc > hm else hm
        return t + self.floor + self.tp_lat + T * self.tp_tok + self.pp_lat + T * self.pp_tok + B * self.tp_seq

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


@dataclass
class SpeculativeStepCost:
    """Speculative decoding on top of a StepCost. Each decode step drafts `k` tokens per sequence
    (a draft model's k decode steps, or n-gram lookup at no accelerator cost) and verifies them in
    one target step of k + 1 tokens per sequence; with per-token acceptance `alpha` a sequence
    gains E = (1 - alpha^(k+1)) / (1 - alpha) tokens per step. The scheduler still emits one token
    per step, so a decode-only step is charged (draft + verify) / E: throughput and mean TPOT come
    out right, the gaps between tokens are smoothed (the real stream arrives in bursts of E).
    Steps with a prefill chunk run as without speculation."""

    base: StepCost
    k: int
    alpha: float
    draft: StepCost | None = None  # None: n-gram / self-drafting (no accelerator time)

    def __post_init__(self) -> None:
        if self.k < 1 or not 0.0 <= self.alpha < 1.0:
            raise ValueError("speculative decoding needs --spec-tokens >= 1 and 0 <= --spec-acceptance < 1")
        self.cal = self.base.cal
        self.request_overhead_s = self.base.request_overhead_s
        self.gain = (1.0 - self.alpha ** (self.k + 1)) / (1.0 - self.alpha)

    def time(self, T: int, S: int, A: int, K: int, B: int, P: int = 0) -> float:
        if P:
            return self.base.time(T, S, A, K, B, P)
        k1 = self.k + 1
        t = self.base.time(T * k1, S, A * k1, K + B * self.k, B, 0)
        if self.draft is not None:
            t += self.k * self.draft.time(T, S, A, K, B, 0)
        return t / self.gain

    def decode_step(self, batch: int, context: int) -> float:
        return self.time(batch, batch, batch * (context + 1), batch * (context + 1), batch)

    def prefill_time(self, prompt: int, chunk: int = 1 << 30) -> float:
        return self.base.prefill_time(prompt, chunk)

    def single_stream_tok_s(self, context: int = 1024) -> float:
        return 1.0 / self.decode_step(1, context)


def ceil_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
