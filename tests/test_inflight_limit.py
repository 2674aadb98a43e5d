"""The server's bound on requests in flight follows the serving pool as it scales at run time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from splitserve.api.errors import APIError
from splitserve.api.request_path import Admission
from splitserve.api.server import ServerState

TOKENIZER = SimpleNamespace(max_token_bytes=4, may_shrink_text=False)


def state(targets, seats=3):
    return ServerState(client=SimpleNamespace(targets=targets), tokenizer=TOKENIZER, model_name="m",
                       model_aliases=frozenset({"m"}), max_model_len=64, max_inflight=seats, api_key=None,
                       metrics=None, started=0.0, seats_per_worker=seats)


def test_a_scaled_decode_pool_takes_its_new_seats_and_a_shrunk_one_gives_them_back():
    s = state({"prefill": 1, "decode": 1})
    held = [Admission(s, 1) for _ in range(3)]
    with pytest.raises(APIError) as e:
        Admission(s, 1)
    assert e.value.status == 503
    s.client.targets["decode"] = 2  # POST /cluster/scale {"decode": 2}
    held += [Admission(s, 1) for _ in range(3)]
    with pytest.raises(APIError):
        Admission(s, 1)
    s.client.targets["decode"] = 1
    for a in held[:3]:
        a.release()
    with pytest.raises(APIError):  # 3 still in flight fill the one worker's seats
        Admission(s, 1)
    assert s.admitted == 3


def test_an_aggregated_pool_counts_too_and_a_fixed_bound_stays_fixed():
    s = state({"both": 2})
    assert s.inflight_limit() == 6
    fixed = state({"both": 2})
    fixed.seats_per_worker = 0
    assert fixed.inflight_limit() == 3
