"""The real server over real HTTP with the official `openai` client, on the demo model, in
aggregated mode and in disaggregated mode (1 prefill + 1 decode worker).

Every test ends with a leak check: nothing in flight, no request, KV block or shared-memory
segment held by any worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest

from tests.conftest import DEMO_AGGREGATED
from tests.server_utils import ServerProcess, pid_alive

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


MODES = {
    "aggregated": ("--threads", "1"),  # 1 thread: the gateway and the test client share the 2 CI cores
    "disaggregated": ("--disaggregated", "--threads", "1"),
}


@pytest.fixture(scope="module", params=sorted(MODES))
def server(request, shared_servers):
    if request.param == "aggregated":  # the session's shared server (tests/bench uses it too)
        yield shared_servers.get(*DEMO_AGGREGATED)
        return
    with ServerProcess("--model", "demo", "--max-model-len", "2048", *MODES[request.param]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(autouse=True)
def leak_check(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").wait_idle()


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_chat_greedy_stream_equals_non_stream(client):
    full = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 40 and full.usage.prompt_tokens > 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=40,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        if delta.content:
            pieces.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert roles == ["assistant"]
    assert "".join(pieces) == text
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_prompt_forms_and_echo(client):
    a = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=8, temperature=0)
    ids = a.usage.prompt_tokens
    b = client.completions.create(model="demo", prompt=["The capital of France is", "Water boils at"],
                                  max_tokens=8, temperature=0)
    assert [c.index for c in b.choices] == [0, 1]
    assert b.choices[0].text == a.choices[0].text
    assert b.usage.completion_tokens == 16 or b.choices[0].finish_reason == "stop" or b.choices[1].finish_reason == "stop"
    echo = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=8, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "The capital of France is" + a.choices[0].text
    assert ids == 5


def test_token_id_prompt_matches_text_prompt(client):
    text = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=10, temperature=0)
    from splitserve.models.registry import demo_model_path
    from splitserve.models.tokenizer import load_tokenizer

    ids = load_tokenizer(demo_model_path()).encode("Once upon a time")
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text


def test_n_choices_with_seed_are_reproducible_and_distinct(client):
    kw = dict(model="demo", messages=CHAT, max_tokens=20, temperature=1.0, n=3, seed=1234)
    first = client.chat.completions.create(**kw)
    second = client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1
    assert first.usage.completion_tokens == sum(
        len(c.logprobs.content) if c.logprobs else 0 for c in first.choices) or first.usage.completion_tokens > 0


def test_n_choices_streaming_interleaves_indexes(client):
    stream = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=12, temperature=0.8, n=2,
                                            seed=5, stream=True, stream_options={"include_usage": True})
    texts = {0: "", 1: ""}
    finished = set()
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
            continue
        ch = chunk.choices[0]
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            finished.add(ch.index)
    assert finished == {0, 1}
    assert usage.completion_tokens <= 24
    same = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=12, temperature=0.8, n=2, seed=5)
    assert [c.message.content for c in same.choices] == [texts[0], texts[1]]


def test_stop_strings_cut_text_streaming_and_not(client):
    base = client.completions.create(model="demo", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0)
    text = base.choices[0].text
    words = [w for w in text.split(" ") if len(w) >= 2]
    assert words, text
    stop = words[min(2, len(words) - 1)]
    cut = text[: text.index(stop)]
    res = client.completions.create(model="demo", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[stop])
    assert res.choices[0].text == cut
    assert res.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_stop_token_ids_and_ignore_eos(client):
    res = client.completions.create(model="demo", prompt="Hello", max_tokens=25, temperature=0,
                                    extra_body={"ignore_eos": True, "min_tokens": 25})
    assert res.usage.completion_tokens == 25 and res.choices[0].finish_reason == "length"


def test_chat_logprobs(client):
    res = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    assert "".join(e.token for e in content if not e.token.startswith("bytes:")) in res.choices[0].message.content + "<|im_end|>"


def test_completion_logprobs_streaming(client):
    chunks = list(client.completions.create(model="demo", prompt="The sky is", max_tokens=6, temperature=0,
                                            logprobs=2, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == 6


# ---- bad input: clear OpenAI-style errors, never a crash ----------------------------------------------
@pytest.mark.parametrize("kwargs,status,fragment", [
    (dict(temperature=-1), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(n=100), 400, "n"),
    (dict(top_logprobs=50, logprobs=True), 400, "top_logprobs"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(max_tokens=4000), 400, "maximum context length"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, "role"),
    (dict(messages=[]), 400, "messages"),
    (dict(model="gpt-17"), 404, "does not exist"),
    (dict(logit_bias={"5": 1.0}), 400, "logit_bias"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "image_url"),
])
def test_bad_chat_requests(client, kwargs, status, fragment):
    body = dict(model="demo", messages=CHAT, max_tokens=5)
    body.update(kwargs)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**body)
    assert err.value.status_code == status
    data = err.value.response.json()
    assert set(data["error"]) >= {"message", "type", "code"}
    assert fragment in data["error"]["message"]


def test_malformed_bodies(server):
    url = server.base_url + "/v1/chat/completions"
    assert httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(url, json=[1, 2]).status_code == 400
    assert httpx.post(url, json={"messages": "hi"}).status_code == 400
    big = {"messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    r = httpx.post(url, json=big)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": [10**9], "max_tokens": 2})
    assert r.status_code == 400
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": [], "max_tokens": 2})
    assert r.status_code == 400


def test_client_disconnect_mid_stream_frees_blocks(server):
    body = {"model": "demo", "prompt": "Tell me a long story.", "max_tokens": 1500, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/v1/completions", json=body) as r:
            lines = 0
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines += 1
                if lines >= 3:
                    break  # closing the response drops the connection
    cluster = server.wait_idle(timeout=10)  # it would take far longer to finish 1500 tokens
    assert all(w["state"] == "ready" for w in cluster["workers"])


def test_client_disconnect_non_streaming_frees_blocks(server):
    body = {"model": "demo", "prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=1.0)
    server.wait_idle(timeout=10)


def test_many_concurrent_requests_all_complete(server):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        tasks = [aclient.completions.create(model="demo", prompt=f"Number {i}:", max_tokens=8, temperature=0)
                 for i in range(24)]
        res = await asyncio.gather(*tasks)
        await aclient.close()
        return res
    results = asyncio.run(run())
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)


def test_metrics_exposes_vllm_style_names(server, client):
    client.completions.create(model="demo", prompt="Hi", max_tokens=3)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("splitserve:time_to_first_token_seconds_bucket", "splitserve:inter_token_latency_seconds_bucket",
                 "splitserve:e2e_request_latency_seconds_bucket", "splitserve:num_requests_running",
                 "splitserve:num_requests_waiting", "splitserve:kv_cache_usage_perc", "splitserve:kv_blocks_free",
                 "splitserve:prompt_tokens_total", "splitserve:generation_tokens_total",
                 "splitserve:request_success_total"):
        assert name in text, name


def test_worker_crash_mid_request_is_invisible_to_the_client(server, client):
    """kill -9 the engine worker mid-generation: the supervisor restarts it, the gateway re-prefills
    prompt + streamed tokens, and the client gets exactly the undisturbed output."""
    body = {"model": "demo", "prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    undisturbed = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120).json()
    decode = [w for w in server.cluster()["workers"] if w["role"] in ("both", "decode")][0]
    pid = decode["pid"]

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as http:
            task = asyncio.create_task(http.post(server.base_url + "/v1/completions", json=body))
            await asyncio.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            return await task

    resp = asyncio.run(scenario())
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["choices"][0]["text"] == undisturbed["choices"][0]["text"]
    assert got["usage"]["completion_tokens"] == 400
    deadline = time.time() + 10
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)
    info = server.cluster()
    restarted = [w for w in info["workers"] if w["id"] == decode["id"]][0]
    assert restarted["restarts"] == 1 and info["requests_replaced"] >= 1
    ok = client.completions.create(model="demo", prompt="Hi", max_tokens=3)
    assert ok.choices[0].text is not None


def test_auth_and_bounded_queue():
    with ServerProcess("--model", "demo", "--threads", "1", "--max-model-len", "512", "--max-num-seqs", "2",
                       "--max-waiting", "2", api_key="s3cret") as s:
        bad = openai.OpenAI(base_url=s.base_url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.status_code == 401
        assert httpx.post(s.base_url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        good = openai.AsyncOpenAI(base_url=s.base_url + "/v1", api_key="s3cret", max_retries=0, timeout=300)

        async def flood():
            tasks = [good.completions.create(model="demo", prompt="Go", max_tokens=64, extra_body={"ignore_eos": True})
                     for _ in range(12)]
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(flood())
        rejected = [r for r in results if isinstance(r, openai.APIStatusError)]
        served = [r for r in results if not isinstance(r, Exception)]
        assert rejected and all(r.status_code == 503 for r in rejected)
        assert served and len(served) + len(rejected) == 12
        s.wait_idle()
