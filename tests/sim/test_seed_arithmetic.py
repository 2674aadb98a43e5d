"""The project seed's arithmetic, reproduced (by hand and through the simulator)."""

from __future__ import annotations

import pytest

from splitserve.bench import workloads as wl
from splitserve.bench.metrics import summarize
from splitserve.sim.cost import Deployment, FamilyParams, StepCost
from splitserve.sim.fleet import chain_seconds, systems_for_power
from splitserve.sim.hardware import get_hardware
from splitserve.sim.models import get_model
from splitserve.sim.simulator import PoolSpec, SimConfig, Simulation


def test_750_mw_of_cs3():
    cs3 = get_hardware("cs3")
    assert systems_for_power(750e6, cs3.power_w) == pytest.approx(32_600, rel=0.001)
    low, high = systems_for_power(750e6, cs3.power_w, 12e3), systems_for_power(750e6, cs3.power_w, 10e3)
    assert round(low, -2) == 21_400 and round(high, -2) == 22_700


def test_agent_chain_by_hand():
    assert chain_seconds(10, 150, 50) == pytest.approx(30.0)
    assert chain_seconds(10, 150, 1200) < 3.0


@pytest.mark.parametrize("tok_s,expect_lo,expect_hi", [(50, 29.5, 30.5), (1200, 1.0, 3.0)])
def test_agent_chain_through_the_simulator(tok_s, expect_lo, expect_hi):
    """A device whose every step takes 1/tok_s seconds (a latency floor, nothing else)."""
    fam = FamilyParams(1.0, 1.0, 0.0, 1.0 / tok_s, f"{tok_s} tok/s stream")
    m = get_model("smollm2-135m")
    d = Deployment(get_hardware("h100"), m, "bf16", "bf16", family=fam)
    c = StepCost(d)
    pool = PoolSpec("both", 1, 2000, c, kv_bytes_per_token=d.kv_bytes_per_token, num_layers=m.num_layers)
    sim = Simulation(SimConfig(max_model_len=4096), [pool], concurrency=1)
    specs = wl.agent_chains(num_chains=1, steps=10, tool_tokens=50, answer_tokens=150)
    sink = sim.run(specs)
    s = summarize(sink.records)
    assert s.completed_chains == 1
    chain_s = s.chain_ms.mean / 1000
    assert expect_lo < chain_s < expect_hi
    # 10 prefill steps (each also samples the first token) + 10 x 149 decode steps
    assert sim.num_steps == 1500
