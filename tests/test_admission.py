"""The decode backpressure policy (cluster/admission.py), pure, on a fake clock."""

from __future__ import annotations

import pytest

from splitserve.cluster.admission import AdmissionConfig, DecodeAdmission, Verdict, can_take
from splitserve.cluster.router import Router, WorkerView


def decode(wid="d0", seats=2, free=100, total=100, running=0, waiting=0, healthy=True) -> WorkerView:
    return WorkerView(wid, "decode", 16, total, healthy=healthy, kv_blocks_free=free, num_running=running,
                      num_waiting=waiting, max_running=seats)


def test_admits_at_once_when_a_decode_worker_has_a_seat_and_kv():
    adm = DecodeAdmission()
    assert adm.offer("a", 100, 50, [decode()], now=0.0) is Verdict.ADMIT
    assert len(adm) == 0 and adm.stats(0.0).admitted == 1


def test_holds_when_every_seat_is_taken_or_kv_is_short():
    adm = DecodeAdmission()
    full_seats = decode(running=1, waiting=1)  # running + waiting (reserving) fill both seats
    short_kv = decode("d1", seats=8, free=10, total=100, running=3)  # 100 + 50 tokens need 10 + 1 blocks
    assert not can_take(full_seats, 100, 50) and not can_take(short_kv, 100, 50)
    assert adm.offer("a", 100, 50, [full_seats, short_kv], now=1.0) is Verdict.QUEUED
    assert adm.pop_ready([full_seats, short_kv]) is None
    s = adm.stats(now=4.5)
    assert (s.length, s.oldest_wait_s, s.queued) == (1, 3.5, 1)


def test_output_headroom_is_capped_and_an_idle_worker_takes_anything():
    adm = DecodeAdmission(AdmissionConfig(output_reserve_tokens=16))
    w = decode(seats=8, free=9, total=100, running=1)  # 100 prompt + 16 reserved tokens: 8 + 1 blocks
    assert adm.offer("a", 100, 10_000, [w], now=0.0) is Verdict.ADMIT
    assert can_take(decode(free=5, total=5), 4000, 256)  # idle: the worker itself decides (no deadlock)
    assert not can_take(decode(healthy=False), 1, 1)
    assert not can_take(WorkerView("p0", "prefill", 16, 100, kv_blocks_free=100), 1, 1)


def test_fifo_order_and_no_overtaking():
    adm = DecodeAdmission()
    busy = decode(seats=1, running=1)
    for i, key in enumerate("abc"):
        assert adm.offer(key, 10, 10, [busy], now=float(i)) is Verdict.QUEUED
    free = decode(seats=1)
    # a newcomer that would fit does not jump the queue
    assert adm.offer("d", 10, 10, [free], now=3.0) is Verdict.QUEUED
    released = []
    while (key := adm.pop_ready([free])) is not None:
        released.append(key)
        free.num_waiting += 1  # the caller accounts each one (Router.on_dispatch) before the next
        if len(released) == 2:
            break
    assert released == ["a"]  # one seat: one release per report
    free.num_waiting = 0
    assert adm.pop_ready([free]) == "b"
    assert adm.stats(now=10.0).oldest_wait_s == 8.0  # "c" waits since t=2


def test_bound_rejects_beyond_the_queue_and_cancel_frees_a_place():
    adm = DecodeAdmission(AdmissionConfig(max_queue=2))
    busy = [decode(seats=1, running=1)]
    assert [adm.offer(k, 10, 10, busy, now=0.0) for k in "abc"] == [Verdict.QUEUED, Verdict.QUEUED, Verdict.REJECTED]
    assert adm.stats(0.0).rejected == 1
    assert adm.cancel("a") and not adm.cancel("a")
    assert adm.offer("c", 10, 10, busy, now=1.0) is Verdict.QUEUED
    with pytest.raises(ValueError):
        adm.offer("c", 10, 10, busy, now=1.0)


def test_releases_as_capacity_frees_through_router_accounting():
    """The router's load reports and its optimistic on_dispatch accounting drive the releases."""
    router = Router()
    router.add_worker(decode("d0", seats=2, free=1000, total=1000))
    adm = DecodeAdmission()
    views = router.workers.values()
    admitted = []
    for i in range(5):
        if adm.offer(str(i), 32, 16, views, now=float(i)) is Verdict.ADMIT:
            router.on_dispatch(router.place(list(range(32))), 32)
            admitted.append(str(i))
    assert admitted == ["0", "1"] and len(adm) == 3
    router.update_load("d0", kv_blocks_free=996, num_running=1, num_waiting=0, queued_prefill_tokens=0)  # one done
    while (key := adm.pop_ready(views)) is not None:
        router.on_dispatch(router.place(list(range(32))), 32)
        admitted.append(key)
    assert admitted == ["0", "1", "2"] and len(adm) == 2


def test_disabled_admits_everything():
    adm = DecodeAdmission(AdmissionConfig(enabled=False))
    assert adm.offer("a", 10, 10, [decode(seats=1, running=1)], now=0.0) is Verdict.ADMIT


def test_config_is_checked():
    with pytest.raises(ValueError):
        AdmissionConfig(max_queue=-1)
