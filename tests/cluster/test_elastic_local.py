"""Elastic pools on local worker processes: scale up and down under load with no failed request,
drain (in-flight requests finish; past the deadline they move, token-identical), bad input.
Every server stop checks that no worker process and no shared memory outlived it."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from splitserve.testing import ServerProcess, pid_alive, wait_for
from tests.cluster.conftest import PROMPTS, TINY_ARGS, async_wait_for, completion, stream_text

pytestmark = pytest.mark.slow

LONG_TOKENS = 400


def _post(server, path: str, body=None, raw: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    h = dict(server.headers, **(headers or {}))
    if raw is not None:
        return httpx.post(server.base_url + path, content=raw, headers=h, timeout=30)
    return httpx.post(server.base_url + path, json=body, headers=h, timeout=30)


def _workers(server, role: str | None = None) -> list[dict]:
    return [w for w in server.cluster()["workers"] if role is None or w["role"] == role]


async def _references(base_url: str, prompts: list[str], max_tokens: int) -> dict[str, str]:
    async with httpx.AsyncClient(timeout=300) as http:
        return {p: await stream_text(http, base_url, p, max_tokens) for p in prompts}


def test_scale_up_and_down_under_load_fails_no_request(tiny_served):
    with ServerProcess("--model", tiny_served, *TINY_ARGS, "--disaggregated") as s:
        reference = {p: completion(s.base_url, p, 48) for p in PROMPTS}

        async def scenario():
            results, stop = [], asyncio.Event()
            async with httpx.AsyncClient(timeout=300) as http:
                async def client(i: int) -> None:
                    n = 0
                    while not stop.is_set():
                        body = {"prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": 48, "temperature": 0,
                                "ignore_eos": True}
                        results.append((body["prompt"], await http.post(s.base_url + "/v1/completions", json=body)))
                        n += 1

                load = [asyncio.create_task(client(i)) for i in range(4)]
                await asyncio.sleep(1.0)
                up = await asyncio.to_thread(_post, s, "/cluster/scale", {"prefill": 2, "decode": 2})
                assert up.status_code == 200, up.text
                started = up.json()["started"]
                assert len(started) == 2 and up.json()["targets"] == {"prefill": 2, "decode": 2}
                new_decode = [w for w in started if w.startswith("decode")][0]

                def served_by_new():
                    ws = {w["id"]: w for w in _workers(s)}
                    return all(ws[w]["state"] == "ready" for w in started) and \
                        ws[new_decode]["load"] and ws[new_decode]["load"]["decode_steps"] > 0
                await async_wait_for(served_by_new)
                down = await asyncio.to_thread(_post, s, "/cluster/scale", {"prefill": 1, "decode": 1})
                assert down.status_code == 200, down.text
                drained = down.json()["draining"]
                assert len(drained) == 2
                pids = [w["pid"] for w in _workers(s) if w["id"] in drained]
                await async_wait_for(lambda: not {w["id"] for w in _workers(s)} & set(drained))
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*load)
            return results, drained, pids

        results, drained, pids = asyncio.run(scenario())
        assert len(results) >= 8
        for prompt, r in results:  # every request answered in full, as when served alone
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == reference[prompt]
        info = s.wait_idle()
        assert info["pools"]["prefill"]["target"] == 1 and info["pools"]["decode"]["target"] == 1
        assert len(info["workers"]) == 2
        # Re-placements are allowed (invisible to clients): a fresh prefill worker's first transfers
        # to an older decode worker sometimes end kv_lost on this build and are placed again.
        assert set(info["requests_replaced_by_reason"]) <= {"kv_lost"}, info["requests_replaced_by_reason"]
        assert {d["worker"] for d in info["drains"]} == set(drained)
        assert all(not pid_alive(p) for p in pids)


@pytest.fixture(scope="module")
def server(tiny_served):
    with ServerProcess("--model", tiny_served, *TINY_ARGS, "--disaggregated", "--decode-workers", "2",
                       api_key="elastic-test-key") as s:
        s.reference = asyncio.run(_references_with_key(s, PROMPTS[0], LONG_TOKENS))
        yield s


async def _references_with_key(s, prompt, max_tokens) -> str:
    async with httpx.AsyncClient(timeout=300, headers=s.headers) as http:
        return await stream_text(http, s.base_url, prompt, max_tokens)


def _drain_mid_stream(s, deadline_s: float) -> tuple[str, dict, int]:
    """Stream a long completion; after a few tokens drain the decode worker generating it."""
    async def scenario():
        drained = {}

        async def drain_when_running(n_tokens: int) -> None:
            if n_tokens != 5:
                return
            busy = await async_wait_for(lambda: [w for w in _workers(s, "decode")
                                                 if w["load"] and w["load"]["num_running"] > 0], timeout=30, step=0.02)
            r = await asyncio.to_thread(_post, s, f"/cluster/workers/{busy[0]['id']}/drain",
                                        {"deadline_s": deadline_s})
            assert r.status_code == 202, r.text
            drained.update(r.json(), pid=busy[0]["pid"])

        tasks = []
        async with httpx.AsyncClient(timeout=300, headers=s.headers) as http:
            text = await stream_text(http, s.base_url, PROMPTS[0], LONG_TOKENS,
                                     on_token=lambda n: tasks.append(asyncio.create_task(drain_when_running(n))))
            await asyncio.gather(*tasks)
        return text, drained

    replaced = s.cluster()["requests_replaced"]
    text, drained = asyncio.run(scenario())
    wait_for(lambda: drained["worker"] not in {w["id"] for w in _workers(s)}, timeout=60)
    assert not pid_alive(drained["pid"])
    record = [d for d in s.cluster()["drains"] if d["worker"] == drained["worker"]][0]
    s.wait_idle()
    # back to two decode workers for the next test
    assert _post(s, "/cluster/scale", {"decode": 2}).status_code == 200
    wait_for(lambda: sum(w["state"] == "ready" for w in _workers(s, "decode")) == 2)
    return text, record, s.cluster()["requests_replaced"] - replaced


def test_drain_lets_in_flight_requests_finish(server):
    text, record, replaced = _drain_mid_stream(server, deadline_s=300)
    assert text == server.reference
    assert record["moved"] == 0 and replaced == 0


def test_drain_past_its_deadline_moves_requests_with_no_gap_and_no_duplicate(server):
    text, record, replaced = _drain_mid_stream(server, deadline_s=0)
    assert text == server.reference
    assert record["moved"] == 1 and replaced == 1


@pytest.mark.parametrize("path,body,status,match", [
    ("/cluster/workers/no-such-worker/drain", {}, 404, "no worker has the id"),
    ("/cluster/scale", {"decode": 0}, 400, "at least one decode worker"),
    ("/cluster/scale", {"prefill": -1}, 400, "between 0 and"),
    ("/cluster/scale", {"decode": 1000}, 400, "between 0 and"),
    ("/cluster/scale", {"decode": "2"}, 400, "valid integer"),
    ("/cluster/scale", {"decode": True}, 400, "valid integer"),
    ("/cluster/scale", {"decode": 1.5}, 400, "valid integer"),
    ("/cluster/scale", {}, 400, "prefill and/or decode"),
    ("/cluster/scale", {"decode": 2, "gpus": 1}, 400, "Extra inputs"),
    ("/cluster/scale", b"{not json", 400, "not valid JSON"),
    ("/cluster/scale", b"[1, 2]", 400, "JSON object"),
    ("/cluster/workers/decode-1/drain", {"deadline_s": -1}, 400, "greater than or equal"),
    ("/cluster/workers/decode-1/drain", {"deadline_s": "soon"}, 400, "deadline_s"),
])
def test_bad_scale_and_drain_requests_are_clear_errors_that_change_nothing(server, path, body, status, match):
    before = server.cluster()
    r = _post(server, path, raw=body) if isinstance(body, bytes) else _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"] in ("invalid_request_error", "not_found_error")
    after = server.cluster()
    assert after["pools"] == before["pools"]
    assert [(w["id"], w["state"]) for w in after["workers"]] == [(w["id"], w["state"]) for w in before["workers"]]


def test_scale_and_drain_need_the_api_key(server):
    for path in ("/cluster/scale", "/cluster/workers/decode-1/drain"):
        r = httpx.post(server.base_url + path, json={"decode": 3}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert server.cluster()["pools"]["decode"]["target"] == 2


def test_the_last_decode_worker_cannot_be_drained(server):
    decode = [w["id"] for w in _workers(server, "decode")]
    assert _post(server, f"/cluster/workers/{decode[0]}/drain", {"deadline_s": 60}).status_code == 202
    r = _post(server, f"/cluster/workers/{decode[1]}/drain", {})
    assert r.status_code == 400 and "last decode worker" in r.json()["error"]["message"]
    wait_for(lambda: len(_workers(server, "decode")) == 1)
    assert _post(server, "/cluster/scale", {"decode": 2}).status_code == 200
    wait_for(lambda: sum(w["state"] == "ready" for w in _workers(server, "decode")) == 2)
    server.wait_idle()


def test_splitserve_scale_cli(server):
    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "splitserve", "scale", "--url", server.base_url,
                               "--api-key", server.api_key, *argv], capture_output=True, text=True, timeout=60)

    up = cli("--prefill", "2")
    assert up.returncode == 0, up.stderr
    assert '"prefill": 2' in up.stdout
    new = [w for w in _workers(server, "prefill") if w["state"] != "draining"]
    assert len(new) == 2
    bad = cli("--drain", "nope")
    assert bad.returncode == 1 and "404" in bad.stderr and "no worker has the id" in bad.stderr
    wait_for(lambda: all(w["state"] == "ready" for w in _workers(server, "prefill")))
    drained = cli("--drain", new[-1]["id"], "--deadline", "5")
    assert drained.returncode == 0, drained.stderr
    wait_for(lambda: len(_workers(server, "prefill")) == 1)
    assert server.cluster()["pools"]["prefill"]["target"] == 1
    assert cli("--decode", "0").returncode == 1
    server.wait_idle()


def test_aggregated_server_scales_its_one_pool(tiny_served):
    with ServerProcess("--model", tiny_served, *TINY_ARGS) as s:
        want = s.base_url
        r = httpx.post(want + "/cluster/scale", json={"prefill": 1}, timeout=30)
        assert r.status_code == 400 and "no prefill pool" in r.json()["error"]["message"]
        r = httpx.post(want + "/cluster/scale", json={"decode": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["targets"] == {"both": 2}
        wait_for(lambda: sum(w["state"] == "ready" for w in _workers(s)) == 2)
        r = httpx.post(want + "/cluster/scale", json={"decode": 1}, timeout=30)
        assert r.status_code == 200 and len(r.json()["draining"]) == 1
        wait_for(lambda: len(_workers(s)) == 1)
        s.wait_idle()
