"""From `--hardware h100:8 --model llama-3.1-70b` to pools of simulated workers.

Replica sizing: a replica is the fewest units whose memory holds the weights plus a working KV
pool (`WORKING_KV_REQUESTS` requests of max_model_len tokens), rounded as the hardware family
shards models:
  * GPU / TPU / Trainium: tensor parallel in powers of two inside the scale-up domain (NVLink,
    ICI, NeuronLink), pipeline parallel across domains;
  * Cerebras CS-3: whole layers per system, pipelined across systems (Llama-3.1-70B at 16-bit:
    4 systems);
  * Groq LPU: layers pipelined chip to chip, each layer tensor-split over as many chips as it needs.
`--hardware HW:N` with N units gives N // units-per-replica replicas (data parallel).

Pipeline parallel replicas run `pp` micro-batches at once (one Scheduler each with 1/pp of the KV
blocks, as vLLM's virtual engines): each micro-batch's step takes the whole pipeline's latency,
and pp of them keep every stage busy. When the KV pool is too small for pp micro-batches of
`WORKING_KV_REQUESTS` long requests each, fewer micro-batches run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from splitserve.sim.cost import Deployment, SpeculativeStepCost, StepCost, ceil_pow2
from splitserve.sim.hardware import Hardware
from splitserve.sim.models import ModelSpec, dtype_bytes
from splitserve.sim.simulator import PoolSpec, SimConfig

WORKING_KV_REQUESTS = 4


@dataclass
class PoolPlan:
    deployment: Deployment
    replicas: int
    microbatches: int  # schedulers per replica (pipeline micro-batches)
    blocks_per_worker: int
    note: str

    @property
    def units(self) -> int:
        return self.replicas * self.deployment.units

    @property
    def num_workers(self) -> int:
        return self.replicas * self.microbatches

    def describe(self) -> str:
        d = self.deployment
        mb = f", {self.microbatches} micro-batches" if self.microbatches > 1 else ""
        return (f"{self.units} x {d.hardware.name} = {self.replicas} replica(s) of {d.units} "
                f"({'TP' + str(d.tp)}{' x PP' + str(d.pp) if d.pp > 1 else ''}"
                f"{', EP' + str(d.ep) if d.ep > 1 else ''}{', attention DP' if d.attn_dp else ''}{mb}); "
                f"{self.blocks_per_worker} KV blocks per scheduler")


def min_units(hw: Hardware, model: ModelSpec, weight_dtype: str, kv_dtype: str, max_model_len: int) -> int:
    need = model.weight_bytes(weight_dtype) + WORKING_KV_REQUESTS * max_model_len * model.kv_bytes_per_token(kv_dtype)
    return max(1, math.ceil(need / (hw.memory_bytes * hw.memory_usable)))


def shape_for(hw: Hardware, model: ModelSpec, units: int) -> tuple[int, int]:
    """(tp, pp) for a replica of at least `units` units."""
    fam = hw.family
    if fam == "cpu":
        return 1, 1
    if fam == "wafer":
        return 1, units
    if fam == "lpu":
        pp = min(units, model.num_layers)
        return math.ceil(units / pp), pp
    n = ceil_pow2(units)
    tp = min(n, hw.scale_up_size)
    return tp, max(1, n // tp)


def plan_pool(hw: Hardware, model: ModelSpec, *, units: int | None, weight_dtype: str, kv_dtype: str,
              cfg: SimConfig, tp: int | None = None, pp: int | None = None, calibration=None,
              max_blocks_per_worker: int | None = None, stack: str | None = None, ep: int | None = None,
              attn_dp: bool = False) -> PoolPlan:
    need = min_units(hw, model, weight_dtype, kv_dtype, cfg.max_model_len)
    if tp is not None or pp is not None:
        tp, pp = tp or 1, pp or 1
        how = f"TP{tp} x PP{pp} as given"
    else:
        tp, pp = shape_for(hw, model, need)
        how = (f"fewest {hw.name} units holding {model.weight_bytes(weight_dtype) / 1e9:.1f} GB of "
               f"{weight_dtype} weights plus KV for {WORKING_KV_REQUESTS} requests of "
               f"{cfg.max_model_len} tokens: {need}, shaped TP{tp} x PP{pp}")
    dep = Deployment(hw, model, weight_dtype, kv_dtype, tp, pp, calibration=calibration, stack=stack,
                     ep=ep or 1, attn_dp=attn_dp)
    per_replica = dep.units
    if units is None:
        replicas = 1
        note = f"--hardware {hw.name} without a count: one replica, {how}"
    else:
        replicas = units // per_replica
        if replicas < 1:
            raise ValueError(f"{units} x {hw.name} cannot hold {model.name} with {weight_dtype} weights: "
                             f"one replica needs {per_replica} ({how})")
        note = f"{replicas} replica(s) of {per_replica} ({how})"
        if replicas * per_replica != units:
            note += f"; {units - replicas * per_replica} unit(s) left idle"
    kv_tokens = dep.kv_capacity_tokens
    if kv_tokens < cfg.max_model_len:
        raise ValueError(f"{per_replica} x {hw.name} leave room for {kv_tokens} KV tokens of {model.name}, "
                         f"less than one request of max_model_len={cfg.max_model_len}")
    mb = 1
    if pp > 1:
        mb = max(1, min(pp, kv_tokens // (WORKING_KV_REQUESTS * cfg.max_model_len)))
    blocks = kv_tokens // mb // cfg.block_size
    # The scheduler never holds more than max_num_seqs full-length requests; beyond that, blocks
    # only extend prefix-cache retention. Capped to keep thousand-worker runs small in memory.
    cap = max_blocks_per_worker or 4 * cfg.max_num_seqs * math.ceil(cfg.max_model_len / cfg.block_size)
    blocks = max(math.ceil(cfg.max_model_len / cfg.block_size), min(blocks, cap))
    return PoolPlan(dep, replicas, mb, blocks, note)


def pool_spec(plan: PoolPlan, role: str, speculative: tuple | None = None) -> PoolSpec:
    """`speculative`: (draft tokens, acceptance, draft ModelSpec or None for n-gram drafting)."""
    d = plan.deployment
    cost: Any = StepCost(d)
    if speculative is not None and role != "prefill":
        k, alpha, draft_model = speculative
        draft = None
        if draft_model is not None:  # the draft runs on the same units, in the same dtype
            draft = StepCost(Deployment(d.hardware, draft_model, d.weight_dtype, d.kv_dtype, d.tp, 1, family=d.family,
                                        tp_link=d.tp_link))
        cost = SpeculativeStepCost(cost, k, alpha, draft)
    return PoolSpec(role, plan.num_workers, plan.blocks_per_worker, cost,
                    units_per_worker=d.units / plan.microbatches,
                    kv_bytes_per_token=d.kv_bytes_per_token, num_layers=d.model.num_layers)


def default_kv_dtype(weight_dtype: str) -> str:
    """KV cache in 16-bit unless the weights are 8-bit or narrower (then FP8 KV, as FP8
    deployments - MLPerf, Groq - run)."""
    return "fp8" if dtype_bytes(weight_dtype) <= 1 else "bf16"

