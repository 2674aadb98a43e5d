"""Decode backpressure in the simulator: the gateway's admission policy (cluster/admission.py)."""

from __future__ import annotations

import pytest

from splitserve.cluster.admission import AdmissionConfig
from splitserve.sim.hardware import get_link
from splitserve.sim.simulator import Simulation
from tests.sim.test_simulator import cfg, pool, poisson


def saturated(enabled: bool, max_queue: int = 1024, n: int = 120):
    """One prefill worker far faster than a decode worker with 8 seats, offered more than it decodes."""
    sim = Simulation(cfg(max_num_seqs=8, admission=AdmissionConfig(enabled=enabled, max_queue=max_queue)),
                     [pool("prefill"), pool("decode")], link=get_link("ib-ndr"))
    sink = sim.run(poisson(n=n, rate=200.0, inp=256, out=64))
    sim.check_idle()
    assert not sim.decoders[0].handoff.busy
    return sim, sink.summary()


def test_saturated_decode_pool_moves_the_wait_into_ttft():
    _, held = saturated(True)
    _, free = saturated(False)
    assert held.completed == free.completed == 120
    # Without backpressure the first token comes early and the wait is one stall after it.
    assert free.max_itl_ms.max > 1000
    assert held.max_itl_ms.max < free.max_itl_ms.max / 10
    assert held.max_itl_ms.p50 < 100
    assert held.ttft_ms.p50 > 2 * free.ttft_ms.p50


def test_gateway_queue_bound_answers_503_and_releases_the_rest():
    sim, s = saturated(True, max_queue=10)
    assert s.failed > 0 and s.completed + s.failed == 120
    assert set(s.errors) == {"http_503"}
    stats = sim.disagg.admission.stats(sim.now)
    assert stats.rejected == s.failed and stats.length == 0 and stats.queued > 0


def test_aggregated_runs_have_no_gateway_queue():
    sim = Simulation(cfg(), [pool("both", n=2)])
    assert sim.disagg.admission is None
