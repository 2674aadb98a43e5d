"""Disaggregated serving: token-identical to aggregated across topologies, and zero-loss failover.

Float32 on the demo model, so equality is exact arithmetic, not luck. Every test ends with a leak
check across all workers (requests, KV blocks, transfers, shared-memory segments) and every server
stop checks that no worker process outlives it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.server_utils import ServerProcess, pid_alive

pytestmark = pytest.mark.slow

COMMON = ("--model", "demo", "--dtype", "float32", "--max-model-len", "1024", "--threads", "1")
LONG = ("In the beginning the universe was created. This has made a lot of people very angry and been widely "
        "regarded as a bad move. ") * 4
PROMPTS = ["Hi", "The capital of France is", LONG, LONG + "Summarize the text above."]
CHAT = [{"role": "user", "content": LONG + " What is the joke here?"}]


def run_workload(base_url: str) -> list[str]:
    """Completions and a two-turn chat (the second turn reuses the first turn's prefix), greedy."""
    out = []
    with httpx.Client(timeout=300) as http:
        for p in PROMPTS + PROMPTS[2:]:  # repeated long prompts hit the prefix cache
            r = http.post(base_url + "/v1/completions", json={"prompt": p, "max_tokens": 24, "temperature": 0,
                                                               "ignore_eos": True})
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["text"])
        msgs = list(CHAT)
        for _ in range(2):
            r = http.post(base_url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 20, "temperature": 0})
            assert r.status_code == 200, r.text
            answer = r.json()["choices"][0]["message"]["content"]
            out.append(answer)
            msgs = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Shorter, please."}]
    return out


@pytest.fixture(scope="module")
def reference():
    with ServerProcess(*COMMON) as s:
        out = run_workload(s.base_url)
        s.wait_idle()
        return out


TOPOLOGIES = {
    "1P1D": ("--disaggregated",),
    "1P1D-block-sizes-local-prefill": ("--disaggregated", "--prefill-block-size", "32", "--decode-block-size", "8",
                                       "--local-prefill-threshold", "16"),
    "2P1D": ("--disaggregated", "--prefill-workers", "2"),
    "1P2D-tcp": ("--disaggregated", "--decode-workers", "2", "--kv-transport", "tcp"),
}


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_disaggregated_output_identical_to_aggregated(reference, topology):
    with ServerProcess(*COMMON, *TOPOLOGIES[topology]) as s:
        assert run_workload(s.base_url) == reference
        info = s.wait_idle()
        prefill = [w for w in info["workers"] if w["role"] == "prefill"]
        decode = [w for w in info["workers"] if w["role"] == "decode"]
        moved = sum(w["transfers"]["bytes_received"] for w in decode)
        assert moved > 0 and sum(w["transfers"]["done"] for w in decode) > 0
        assert sum(w["transfers"]["bytes_sent"] for w in prefill) == moved
        # The one-copy paths carry the KV: shm writes into the decode cache, or the TCP data port.
        direct = sum(w["transfers"]["bytes_direct"] for w in (decode if "tcp" in topology else prefill))
        assert direct > moved // 2
        # Busy time per role (what sim_vs_live.py compares with the simulator's). A step counts as
        # decode-only when every chunk is one token: a decode worker's steps mostly are, a prefill
        # worker's only when the prefix cache left one prompt token to compute.
        for w in prefill + decode:
            ld = w["load"]
            assert (ld["step_seconds"] > 0) == (ld["num_steps"] > 0)
            assert 0 <= ld["decode_steps"] <= ld["num_steps"] and ld["decode_step_seconds"] <= ld["step_seconds"]
        p_steps = sum(w["load"]["num_steps"] for w in prefill)
        assert p_steps > 0 and sum(w["load"]["decode_steps"] for w in prefill) < p_steps
        d_steps = sum(w["load"]["num_steps"] for w in decode)
        assert sum(w["load"]["decode_steps"] for w in decode) > d_steps // 2
        if "local-prefill" in topology:
            # Short prompts ("Hi", ...) never left the decode worker.
            assert sum(w["transfers"]["done"] for w in decode) < len(PROMPTS) + 2 + 2


@pytest.fixture(scope="module")
def pd_server():
    # Small prefill chunks make prefill slow enough to kill mid-way.
    with ServerProcess(*COMMON, "--disaggregated", "--max-num-batched-tokens", "16") as s:
        yield s


def _worker(server, role):
    return [w for w in server.cluster()["workers"] if w["role"] == role][0]


def _kill_during(server, role: str, body: dict, delay: float) -> httpx.Response:
    victim = _worker(server, role)

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as http:
            task = asyncio.create_task(http.post(server.base_url + "/v1/completions", json=body))
            await asyncio.sleep(delay)
            os.kill(victim["pid"], signal.SIGKILL)
            return await task

    resp = asyncio.run(scenario())
    deadline = time.time() + 120
    while time.time() < deadline and _worker(server, role)["state"] != "ready":
        time.sleep(0.2)
    assert not pid_alive(victim["pid"])
    assert _worker(server, role)["restarts"] >= 1
    return resp


def test_kill_prefill_worker_mid_prefill(pd_server):
    body = {"prompt": LONG * 2, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=300) as http:
        expected = http.post(pd_server.base_url + "/v1/completions", json=body).json()["choices"][0]["text"]
    resp = _kill_during(pd_server, "prefill", body, delay=0.3)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == expected
    assert pd_server.cluster()["requests_replaced"] >= 1
    pd_server.wait_idle()


def test_kill_decode_worker_mid_stream_no_gap_no_duplicate(pd_server):
    body = {"prompt": "Once upon a time", "max_tokens": 150, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=300) as http:
        expected = "".join(_sse_texts(http, pd_server.base_url, body))
    victim = _worker(pd_server, "decode")
    texts = []
    with httpx.Client(timeout=300) as http:
        for i, t in enumerate(_sse_texts(http, pd_server.base_url, body)):
            texts.append(t)
            if i == 20:
                os.kill(victim["pid"], signal.SIGKILL)
    assert "".join(texts) == expected
    assert not pid_alive(victim["pid"])
    pd_server.wait_idle(timeout=60)


def _sse_texts(http, base_url, body):
    import json

    with http.stream("POST", base_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    yield chunk["choices"][0]["text"]


def test_no_prefill_worker_left_decode_prefills_locally():
    with ServerProcess(*COMMON, "--disaggregated") as s:
        p = _worker(s, "prefill")
        before = [w for w in s.wait_idle()["workers"] if w["role"] == "decode"][0]  # loads reported
        # Kill the only prefill worker and wait until the gateway has seen it go: until its restart
        # has loaded the model, the router has no prefill worker and the decode worker prefills.
        os.kill(p["pid"], signal.SIGKILL)
        deadline = time.time() + 30
        while _worker(s, "prefill")["state"] == "ready" and time.time() < deadline:
            time.sleep(0.05)
        r = httpx.post(s.base_url + "/v1/completions", json={"prompt": LONG, "max_tokens": 8, "temperature": 0,
                                                              "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text
        after = [w for w in s.wait_idle(timeout=60)["workers"] if w["role"] == "decode"][0]
        # The decode worker computed the prompt itself: steps that are not decode-only, no KV received.
        prefill_steps = lambda w: w["load"]["num_steps"] - w["load"]["decode_steps"]  # noqa: E731
        assert prefill_steps(after) > prefill_steps(before)
        assert after["transfers"]["done"] == before["transfers"]["done"]
        assert after["transfers"]["bytes_received"] == before["transfers"]["bytes_received"]
        assert r.json()["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("phase", ["queued", "prefilling", "decoding"])
def test_cancel_in_every_phase_frees_both_sides(pd_server, phase):
    body = {"prompt": LONG * 2 if phase != "decoding" else "Go", "max_tokens": 400, "ignore_eos": True,
            "stream": True, "temperature": 0}
    bodies = [body] * (6 if phase == "queued" else 1)

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as http:
            async def one(b):
                async with http.stream("POST", pd_server.base_url + "/v1/completions", json=b) as r:
                    n = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            n += 1
                        if phase == "decoding" and n >= 5:
                            return
            tasks = [asyncio.create_task(one(b)) for b in bodies]
            await asyncio.sleep(0.2 if phase != "decoding" else 0)
            if phase != "decoding":
                for t in tasks:
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    pd_server.wait_idle(timeout=30)


def test_cancel_while_waiting_for_decode_blocks():
    # A decode pool too small for two long prompts: the second waits in "transferring" for blocks.
    with ServerProcess(*COMMON, "--disaggregated", "--num-kv-blocks", "70", "--max-model-len", "1024") as s:
        body = {"prompt": LONG * 4, "max_tokens": 300, "ignore_eos": True, "temperature": 0}

        async def scenario():
            async with httpx.AsyncClient(timeout=120) as http:
                first = asyncio.create_task(http.post(s.base_url + "/v1/completions", json=body))
                await asyncio.sleep(1.0)
                second = asyncio.create_task(http.post(s.base_url + "/v1/completions", json=body))
                await asyncio.sleep(2.0)
                second.cancel()
                first.cancel()
                await asyncio.gather(first, second, return_exceptions=True)

        asyncio.run(scenario())
        s.wait_idle(timeout=30)


def test_decode_backpressure_queues_at_the_gateway_and_completes_everything():
    """A decode worker with two seats and many concurrent requests: the extra requests wait in the
    gateway's queue (visible in GET /cluster) before their prefill starts, and all of them finish."""
    with ServerProcess(*COMMON, "--disaggregated", "--max-num-seqs", "2") as s:
        body = {"prompt": "Count to ten:", "max_tokens": 12, "ignore_eos": True, "temperature": 0}

        async def scenario():
            async with httpx.AsyncClient(timeout=300) as http:
                posts = [asyncio.create_task(http.post(s.base_url + "/v1/completions", json=body)) for _ in range(8)]
                seen = 0
                while not all(p.done() for p in posts):
                    q = (await http.get(s.base_url + "/cluster")).json()["gateway_queue"]
                    seen = max(seen, q["length"])
                    await asyncio.sleep(0.05)
                return [await p for p in posts], seen

        responses, seen = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 8
        assert len({r.json()["choices"][0]["text"] for r in responses}) == 1  # greedy: the same text
        q = s.wait_idle(timeout=30)["gateway_queue"]
        assert q["queued"] >= 1 and seen >= 1 and q["rejected"] == 0 and q["length"] == 0
        assert q["admitted"] == 8
