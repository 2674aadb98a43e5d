"""Cost model: analytic cases against hand-computed numbers, and the family calibration points."""

from __future__ import annotations

from dataclasses import replace

import pytest

from splitserve.sim.cost import FAMILIES, Deployment, FamilyParams, StepCost
from splitserve.sim.hardware import get_hardware
from splitserve.sim.models import get_model

IDEAL = FamilyParams(1.0, 1.0, 0.0, 0.0, "pure roofline (test)")

# Llama-3.1-8B by hand: per layer 4096*4096*2 + 4096*1024*2 (attention) + 3*4096*14336 (MLP)
LAYER_PARAMS = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)  # 6,979,321,856
HEAD = 128256 * 4096  # 525,336,576
KV_BF16 = 2 * 32 * 8 * 128 * 2  # 131,072 bytes per token
PAIR = 4 * 32 * 32 * 128  # FLOPs per (query, key) pair, all layers
H100_BW, H100_BF16 = 3.35e12, 989e12


def ideal_8b(tp=1, family=IDEAL) -> StepCost:
    return StepCost(Deployment(get_hardware("h100"), get_model("llama-3.1-8b"), "bf16", "bf16", tp=tp, family=family))


def test_hand_computed_layer_params():
    assert get_model("llama-3.1-8b").layer_params(active=True) == LAYER_PARAMS == 6_979_321_856


def test_single_decode_step_is_the_bandwidth_roofline():
    c = ideal_8b()
    ctx = 1000  # tokens cached; this step computes token 1001 and reads 1001 KV tokens
    expected = (LAYER_PARAMS * 2 + (1001 + 1) * KV_BF16 + HEAD * 2) / H100_BW
    assert c.decode_step(1, ctx) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(4.5196e-3, rel=1e-4)  # 221 tok/s: the bf16 ceiling of one H100


def test_single_prefill_is_the_compute_roofline():
    c = ideal_8b()
    n = 2048
    pairs = n * (n + 1) // 2
    compute = (2 * LAYER_PARAMS * n + PAIR * pairs) / H100_BF16
    head = HEAD * 2 / H100_BW  # sampling one row: reading the LM head dominates its 2*V*H FLOPs
    assert c.prefill_time(n) == pytest.approx(compute + head, rel=1e-12)
    assert compute + head == pytest.approx(30.33e-3, rel=1e-3)


def test_floors_and_tensor_parallel():
    fam = FamilyParams(1.0, 1.0, 10e-6, 100e-6, "test")
    base, floored = ideal_8b(), ideal_8b(family=fam)
    assert floored.decode_step(1, 100) - base.decode_step(1, 100) == pytest.approx(32 * 10e-6 + 100e-6)
    tp2 = ideal_8b(tp=2)
    ar = tp2.tp_lat + tp2.tp_tok  # two ring all-reduces of one token per layer
    assert tp2.decode_step(1, 100) == pytest.approx(base.decode_step(1, 100) / 2 + ar, rel=1e-9)
    assert ar > 2 * 32 * 3e-6


def test_moe_reads_only_the_experts_a_batch_touches():
    d = Deployment(get_hardware("h200"), get_model("qwen3-235b-a22b"), "fp8", "fp8", tp=4, family=IDEAL)
    c = StepCost(d)
    one, many = c.time(1, 1, 1, 1, 1) - c.m_head, c.time(512, 512, 512, 512, 512) - c.m_head
    m = get_model("qwen3-235b-a22b")
    # batch 1: dense part + 8 of 128 experts per layer
    touched = 1 - (1 - 8 / 128) ** 1
    assert touched * 128 == pytest.approx(8)
    assert one < 0.2 * many
    assert c.m_all_experts == pytest.approx(m.num_moe_layers * 128 * m.expert_params * 1.0 / (4 * 4.8e12))


def test_wafer_single_stream_is_latency_bound_not_bandwidth_bound():
    d = Deployment(get_hardware("cs3"), get_model("llama-3.1-8b"), "bf16", "bf16")
    c = StepCost(d)
    step = c.decode_step(1, 1024)
    roofline = d.weight_bytes / d.hardware.mem_bandwidth
    assert roofline < 1e-6 < step  # 16 GB at 21 PB/s is under a microsecond; a token takes ~0.56 ms
    assert 1 / step == pytest.approx(1800, rel=0.01)  # the calibration point


@pytest.mark.parametrize("hw,model,dtype,published", [
    ("cs3", "llama-3.1-8b", "bf16", 1800),  # Cerebras, 16-bit
    ("groq-lpu", "llama-3.1-8b", "int8", 751),  # Groq, 8-bit
    ("h100", "llama-3.1-8b", "fp8", 242),  # best H100 cloud provider
])
def test_single_stream_calibration_points(hw, model, dtype, published):
    from splitserve.sim.published import Point, predict

    p = Point(hw, 1 if hw == "h100" else None, model, dtype, "single", published, "")
    assert predict(p) == pytest.approx(published, rel=0.02)


def test_mlperf_h200_offline_calibration_point():
    from splitserve.sim.published import CALIBRATION, predict

    p = CALIBRATION[3]
    assert p.hardware == "h200" and p.value == 4488
    assert predict(p, num_requests=1500) == pytest.approx(4488, rel=0.03)


def test_families_are_shared_not_per_model():
    for name in ("h100", "h200", "b200", "b300", "mi300x", "mi355x"):
        assert get_hardware(name).family == "gpu"
    assert FAMILIES["gpu"] is FAMILIES[get_hardware("b300").family]
    assert replace(FAMILIES["gpu"]).eff_mem == FAMILIES["gpu"].eff_mem
