"""The simulator's disaggregated path runs the live handoff and the live retry policy."""

from __future__ import annotations

from splitserve.bench import workloads as wl
from splitserve.cluster.admission import AdmissionConfig
from splitserve.kv.handoff import RxState
from splitserve.sim.hardware import get_link
from splitserve.sim.simulator import Simulation
from tests.sim.test_simulator import cfg, pool


def test_kv_pressure_with_shared_prefixes_finishes_everything():
    """A decode pool far too small for the load, prompts that share long prefixes: reservations wait
    for blocks (retried on every step, every waiting transfer, as the live receiver does) and a
    prefix evicted between routing and reservation fails the attempt, which the orchestrator
    places again without it. The simulator's own handoff before (first-in-first-out, stopping at
    the first transfer that did not fit, clamping an evicted prefix) ended this run with requests
    stuck on the decode worker."""
    specs = wl.shared_prefix(prefix_len=1500, input_len=wl.parse_length("uniform:100:2000"),
                             output_len=wl.parse_length("uniform:50:400"), num_prefixes=8, num_requests=300,
                             arrival=wl.Arrival(25.0), seed=3)
    # Decode backpressure off: the gateway would otherwise hold these requests until the decode worker
    # has the blocks, and the handoff's waiting path (still live: load reports lag, re-placements skip
    # the gateway queue) would not be exercised. With it on, see the next test.
    sim = Simulation(cfg(admission=AdmissionConfig(enabled=False)), [pool("prefill"), pool("decode", blocks=2000)],
                     link=get_link("ib-ndr"))
    trace: list = []
    sim.decoders[0].handoff.trace = trace
    sink = sim.run(specs)
    sim.check_idle()
    assert sink.builder.ok == 300 and not sink.builder.errors
    reserving = sum(1 for i, (rid, s) in enumerate(trace) if s is RxState.RESERVING)
    waited = {rid for (rid, s), (rid2, s2) in zip(trace, trace[1:]) if s is RxState.RESERVING and rid2 != rid}
    assert reserving >= 300 and waited  # every transfer reserved through the handoff, some had to wait
    evicted = sum(1 for rid, s in trace if s is RxState.FAILED)
    assert evicted == sim.disagg.num_replaced  # each failed attempt was placed again, none given up
    assert not sim.decoders[0].handoff.busy


def test_kv_pressure_with_decode_backpressure_finishes_everything():
    """The same load with the gateway's backpressure on: requests wait in front of prefill, not on the
    decode worker, and all of them finish with no block left."""
    specs = wl.shared_prefix(prefix_len=1500, input_len=wl.parse_length("uniform:100:2000"),
                             output_len=wl.parse_length("uniform:50:400"), num_prefixes=8, num_requests=300,
                             arrival=wl.Arrival(25.0), seed=3)
    sim = Simulation(cfg(), [pool("prefill"), pool("decode", blocks=2000)], link=get_link("ib-ndr"))
    sink = sim.run(specs)
    sim.check_idle()
    assert sink.builder.ok == 300 and not sink.builder.errors
    assert sim.disagg.admission.stats(sim.now).queued > 0 and not sim.decoders[0].handoff.busy
