"""The autoscaler's load monitor on a fake clock: rate, lengths, prefix hits, percentiles, step times."""

from __future__ import annotations

import pytest

from splitserve.cluster import messages as m
from splitserve.cluster.load_monitor import LoadMonitor, percentile


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def stats(wid: str, steps: int, secs: float, toks: int, dsteps: int, dsecs: float, dtoks: int) -> m.Stats:
    return m.Stats(wid, 0, 0, 0, 0, 10, 0, 0, 0, 0, steps, step_seconds=secs, decode_steps=dsteps,
                   decode_step_seconds=dsecs, step_tokens=toks, decode_step_tokens=dtoks,
                   loop_overhead_seconds=0.001 * steps, loop_overhead_steps=steps)


def serve_one(mon: LoadMonitor, clock: Clock, prompt: int, cached: int, ttft: float, gap: float, n: int) -> None:
    timer = mon.start(prompt)
    clock.t += ttft
    timer.on_token(cached)
    for _ in range(n - 1):
        clock.t += gap
        timer.on_token(cached)
    mon.finish(timer)


def test_rate_lengths_hits_and_percentiles_over_the_window():
    clock = Clock()
    mon = LoadMonitor(window_s=10.0, clock=clock)
    for i in range(20):  # 2 requests/s for 10 s, each 0.1 s to first token, 0.01 s per token after
        serve_one(mon, clock, prompt=100, cached=25, ttft=0.1, gap=0.01, n=5)
        clock.t += 0.5 - 0.14
    got = mon.measure()
    assert got.arrival_rate == pytest.approx(2.0, rel=0.15)
    assert got.prompt_lens == (100,) * got.num_finished and set(got.output_lens) == {5}
    assert got.prefix_hit_rate == pytest.approx(0.25)
    assert got.ttft_ms == pytest.approx(100.0) and got.tpot_ms == pytest.approx(10.0)
    clock.t += 30  # the window moved past them all
    later = mon.measure()
    assert later.arrival_rate == 0 and later.num_finished == 0 and later.ttft_ms is None


def test_a_rate_step_shows_within_a_third_of_the_window_and_a_drop_takes_all_of_it():
    clock = Clock()
    mon = LoadMonitor(window_s=30.0, clock=clock)
    for _ in range(30):  # 1 request/s for 30 s
        mon.finish(mon.start(10))
        clock.t += 1.0
    assert mon.measure().arrival_rate == pytest.approx(1.0, rel=0.1)
    for _ in range(40):  # then 4/s for 10 s: the last third of the window says 4, the window ~2
        mon.finish(mon.start(10))
        clock.t += 0.25
    assert mon.measure().arrival_rate == pytest.approx(4.0, rel=0.15)
    clock.t += 15.0  # nothing for 15 s: the window still holds the burst
    assert mon.measure().arrival_rate == pytest.approx(40 / 30, rel=0.15)


def test_a_request_without_tokens_counts_as_arrival_but_not_latency():
    clock = Clock()
    mon = LoadMonitor(window_s=5.0, clock=clock)
    mon.finish(mon.start(10))
    got = mon.measure()
    assert got.num_arrivals == 1 and got.ttft_ms is None and got.tpot_ms is None


def test_an_overload_where_nothing_finishes_still_shows():
    """Requests still waiting for their first token count with their wait so far (a lower bound),
    and their lengths (max_tokens for the output) stand in while too few have finished."""
    clock = Clock()
    mon = LoadMonitor(window_s=10.0, clock=clock)
    timers = [mon.start(200, 32) for _ in range(4)]
    clock.t += 3.0
    got = mon.measure()
    assert got.num_finished == 0 and got.num_waiting_first == 4
    assert got.ttft_ms == pytest.approx(3000.0)
    assert got.prompt_lens == (200,) * 4 and got.output_lens == (32,) * 4
    for t in timers:
        t.on_token()
        mon.finish(t)
    assert mon.measure().num_waiting_first == 0


def test_step_times_are_deltas_per_role_and_survive_a_restart():
    clock = Clock()
    mon = LoadMonitor(window_s=10.0, clock=clock)
    mon.observe_workers([("decode-0", "decode", stats("decode-0", 10, 1.0, 40, 10, 1.0, 40)),
                         ("prefill-1", "prefill", stats("prefill-1", 2, 0.4, 512, 0, 0.0, 0)), ("x", "decode", None)])
    clock.t += 5
    # decode-0: 20 more decode steps of 4 sequences, 0.02 s each; prefill-1: 4 more of 256 tokens, 0.1 s each
    mon.observe_workers([("decode-0", "decode", stats("decode-0", 30, 1.4, 120, 30, 1.4, 120)),
                         ("prefill-1", "prefill", stats("prefill-1", 6, 0.8, 1536, 0, 0.0, 0))])
    st = mon.measure().steps
    assert st["decode"].decode_steps == 20 and st["decode"].decode_step_s == pytest.approx(0.02)
    assert st["decode"].decode_batch == pytest.approx(4.0)
    assert st["prefill"].prefill_steps == 4 and st["prefill"].prefill_step_s == pytest.approx(0.1)
    assert st["prefill"].prefill_tokens_per_step == pytest.approx(256)
    assert st["decode"].busy_fraction == pytest.approx(0.4 / 5)
    assert st["decode"].overhead_s == pytest.approx(0.001) and st["prefill"].overhead_s == pytest.approx(0.001)
    clock.t += 5
    # the decode worker restarted: its counters began again, and count from zero
    mon.observe_workers([("decode-0", "decode", stats("decode-0", 5, 0.1, 5, 5, 0.1, 5))])
    st = mon.measure().steps
    assert st["decode"].decode_steps == 5 and st["decode"].decode_step_s == pytest.approx(0.02)


def test_percentile_is_nearest_rank():
    assert percentile([], 90) is None
    assert percentile(range(1, 11), 90) == 9
    assert percentile([5.0], 90) == 5.0
    with pytest.raises(ValueError):
        LoadMonitor(window_s=0)
