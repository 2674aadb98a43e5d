"""`serve --autoscale` live: a load step makes the autoscaler grow a pool, and GET /cluster shows why.

A tiny random model, so steps are fast; the TTFT SLO (1 ms) cannot be met at any size, so once
requests are measured the simulator's answer is the largest size within the bounds, and the
autoscaler must start the worker it lacks. Leak-checked (requests, KV blocks, transfers, shared
memory, processes) after the scenario."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from tests.served_models import write_tiny_served_model
from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_servable(tiny_model_root):
    return write_tiny_served_model(tiny_model_root)


def send_until(server: ServerProcess, stop: threading.Event, errors: list, count: list) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    i = 0
    while not stop.is_set() and not errors:
        try:
            out = client.completions.create(model=model, prompt=f"request {i}: " + "words and more words " * 8,
                                            max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 16
            count.append(1)
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            errors.append(exc)
        i += 1


def test_load_step_scales_the_prefill_pool_up_and_get_cluster_shows_the_decision(tiny_servable):
    args = ("--model", tiny_servable, "--threads", "1", "--max-model-len", "256", "--disaggregated",
            "--autoscale", "--slo-ttft-ms", "1", "--slo-tpot-ms", "10000", "--max-prefill", "2", "--max-decode", "1",
            "--autoscale-interval-s", "1", "--autoscale-window-s", "5")
    with ServerProcess(*args) as server:
        info = server.cluster()
        auto = info["autoscale"]
        assert auto["target"] == {"prefill": 1, "decode": 1}
        assert auto["bounds"] == {"prefill": [1, 2], "decode": [1, 1]}
        assert auto["slo"]["ttft_ms"] == 1 and auto["changes"] == []
        time.sleep(2.5)  # idle intervals: nothing measured, nothing changes
        idle = server.cluster()["autoscale"]
        assert idle["changes"] == [] and idle["intervals"] >= 1
        assert all(d["action"] == "hold" for d in idle["decisions"])

        stop, errors, count = threading.Event(), [], []
        senders = [threading.Thread(target=send_until, args=(server, stop, errors, count)) for _ in range(3)]
        for t in senders:
            t.start()
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                info = server.cluster()
                ready = [w for w in info["workers"] if w["role"] == "prefill" and w["state"] == "ready"]
                if (len(ready) == 2 and len(count) >= 5) or errors:
                    break
                time.sleep(0.5)
            served = len(count)
            while time.time() < deadline and len(count) < served + 12:  # traffic reaches the new worker
                time.sleep(0.2)
        finally:
            stop.set()
            for t in senders:
                t.join()
        assert not errors, errors[:3]
        assert len(ready) == 2, info
        auto = info["autoscale"]
        assert auto["target"] == {"prefill": 2, "decode": 1}
        up = [d for d in auto["changes"] if d["action"] == "scale_up"]
        assert up and up[0]["current"] == {"prefill": 1, "decode": 1} and up[0]["target"]["prefill"] == 2
        assert any("prefill 1 -> 2" in r for r in up[0]["reasons"])
        # whichever saw it first: the TTFT the gateway observed, or the simulator's prediction
        assert any("observed TTFT" in r or "predicted at 1:1" in r for r in up[0]["reasons"]), up[0]
        assert auto["measured"]["arrival_rate"] > 0 and auto["measured"]["finished"] > 0
        assert {"decode", "prefill"} <= set(auto["measured"]["step_times"])
        # by now the simulator has the measured step times: no size meets a 1 ms TTFT, the largest is chosen
        assert auto["predicted_current"]["meets_slo"] is False and auto["predicted_current"]["ttft_ms"] > 1
        assert auto["predicted_target"]["prefill"] == 2 and auto["predicted_target"]["meets_slo"] is False
        assert "no size within the bounds" in auto["predictor"]["note"]
        info = server.wait_idle(timeout=30)  # the leak check (the server's stop checks processes and shm)
        new = [w for w in info["workers"] if w["role"] == "prefill" and w["id"] != "prefill-0"]
        assert len(new) == 1 and new[0]["load"]["num_steps"] > 0  # the new worker took prefills
