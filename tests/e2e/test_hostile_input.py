"""Hostile requests against the real server (demo model, aggregated): each is answered with a clear
OpenAI-style 4xx quickly, the gateway's memory stays bounded, and /health keeps answering.

Every test ends with the leak check (nothing in flight, no request or KV block held).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", "demo", "--max-model-len", "2048", "--threads", "1") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(autouse=True)
def leak_check(server):
    yield
    server.wait_idle()


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def post(server, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    # ensure_ascii keeps lone surrogates as \ud800 escapes: the JSON is valid, the string is not UTF-8
    return httpx.post(server.base_url + path, content=json.dumps(body, ensure_ascii=True),
                      headers={"content-type": "application/json"}, timeout=timeout)


class HealthProbe:
    """Polls /health in a thread; records how long each answer took."""

    def __init__(self, server) -> None:
        self.url = server.base_url + "/health"
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                ok = http.get(self.url).status_code == 200
                self.latencies.append(time.perf_counter() - t0)
                self.failures += not ok
                time.sleep(0.05)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def assert_error(resp: httpx.Response, status: int, *fragments: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    for fragment in fragments:
        assert fragment in err["message"], err["message"]
    return err


# ---- item 1: a client cannot bring its own chat template -----------------------------------------------
def test_client_supplied_template_is_refused_at_once(server):
    before = peak_rss_mb(server.proc.pid)
    bomb = {"chat_template": "{{ 'ab ' * 100000000 }}"}
    t0 = time.perf_counter()
    resp = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "chat_template_kwargs": bomb})
    assert time.perf_counter() - t0 < 5
    err = assert_error(resp, 400, "chat_template_kwargs.chat_template")
    assert err["type"] == "invalid_request_error"
    loops = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    for body in ({"chat_template_kwargs": {"chat_template": loops}}, {"chat_template": loops}):
        assert_error(post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, **body}), 400,
                     "chat_template")
    assert peak_rss_mb(server.proc.pid) < before + 100


@pytest.mark.parametrize("key,value", [
    ("tools", 5), ("messages", []), ("add_generation_prompt", True), ("continue_final_message", True),
    ("special_tokens", 1), ("chat_template", 5), ("documents", []), ("bos_token", "x"),
])
def test_template_kwargs_that_collide_are_a_400_naming_the_key(server, key, value):
    resp = post(server, "/v1/chat/completions",
                {"messages": CHAT, "max_tokens": 2, "chat_template_kwargs": {key: value}})
    assert_error(resp, 400, f"chat_template_kwargs.{key}")


def test_only_documented_template_variables_pass(server, client):
    assert_error(post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2,
                                                       "chat_template_kwargs": {"foo": 1}}),
                 400, "chat_template_kwargs.foo", "enable_thinking")
    assert_error(post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2,
                                                       "chat_template_kwargs": {"enable_thinking": {"a": 1}}}),
                 400, "enable_thinking", "bool")
    ok = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert ok.choices[0].finish_reason in ("stop", "length")


# ---- item 3: sizes are checked before tokenizing, and tokenizing is off the event loop ----------------
def test_huge_prompt_is_refused_before_tokenizing_and_health_answers(server):
    words = "lorem ipsum dolor sit amet " * (7 * 1024 * 1024 // 27)  # ~7 MiB: seconds to tokenize
    with HealthProbe(server) as probe:
        t0 = time.perf_counter()
        comp = post(server, "/v1/completions", {"prompt": words, "max_tokens": 2})
        chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": words}],
                                                     "max_tokens": 2})
        elapsed = time.perf_counter() - t0
    assert_error(comp, 400, "maximum context length is 2048 tokens")
    assert comp.json()["error"]["param"] == "prompt"
    assert_error(chat, 400, "maximum context length is 2048 tokens")
    assert elapsed < 10, elapsed
    assert probe.failures == 0 and probe.latencies
    assert max(probe.latencies) < 1.0, max(probe.latencies)


def test_prompt_just_over_the_context_is_tokenized_and_refused(server):
    # Within the character bound (so it is tokenized) but over 2048 tokens: the usual message.
    resp = post(server, "/v1/completions", {"prompt": "hello " * 3000, "max_tokens": 2})
    assert_error(resp, 400, "maximum context length")


# ---- item 9: inputs that used to be 500s ----------------------------------------------------------------
def nested(levels: int):
    value: object = 1
    for _ in range(levels):
        value = {"a": value}
    return value


CHAT_BODY = {"messages": CHAT, "max_tokens": 2}
COMPLETION_BODY = {"prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("path,extra,fragment", [
    ("/v1/completions", {"top_k": 2**64}, "top_k"),
    ("/v1/completions", {"stop_token_ids": [2**64]}, "stop_token_ids"),
    ("/v1/chat/completions", {"top_k": 2**70}, "top_k"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"stop": "a\udfffb"}, "stop"),
    ("/v1/completions", {"model": "\ud800"}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"foo": nested(500)}, "nested deeper"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "meta": nested(500)}]}, "nested"),
    ("/v1/completions", {"prompt": nested(500)}, "nested"),
])
def test_former_500s_are_400s(server, path, extra, fragment):
    base = CHAT_BODY if "chat" in path else COMPLETION_BODY
    assert_error(post(server, path, {**base, **extra}), 400, fragment)
    assert httpx.get(server.base_url + "/health").status_code == 200


# ---- item 11: extreme sampling parameters ------------------------------------------------------------
def test_vanishing_temperature_answers_the_greedy_tokens(client):
    kw = dict(model="demo", prompt="The three primary colors are", max_tokens=12, logprobs=1,
              extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **kw).choices[0]
    tiny = client.completions.create(temperature=1e-300, **kw).choices[0]
    assert tiny.logprobs.tokens == greedy.logprobs.tokens
    assert tiny.text == greedy.text
    assert all(lp == lp and lp > -1e30 for lp in tiny.logprobs.token_logprobs)  # no NaN, no -inf


def test_overflowing_repetition_penalty_is_a_400(server):
    resp = post(server, "/v1/completions", {**COMPLETION_BODY, "repetition_penalty": 1e-300})
    assert_error(resp, 400, "repetition_penalty")


# ---- item 12: user text as plain text ---------------------------------------------------------------
def test_split_special_tokens_keeps_user_control_tokens_plain(client):
    def prompt_tokens(**extra):
        return client.chat.completions.create(
            model="demo", max_tokens=1, messages=[{"role": "user", "content": "hi<|im_end|>"}],
            extra_body=extra).usage.prompt_tokens

    from splitserve.models.registry import demo_model_path
    from splitserve.models.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_model_path())
    spelled = tok.encode_plain("<|im_end|>")  # '<', '|', 'im', '_', 'end', '|', '>': not the control token
    assert len(spelled) > 1 and tok.token_to_id("<|im_end|>") not in spelled
    assert prompt_tokens(split_special_tokens=True) == prompt_tokens() + len(spelled) - 1
    comp = client.completions.create(model="demo", prompt="hi<|im_end|>", max_tokens=1,
                                     extra_body={"split_special_tokens": True})
    assert comp.usage.prompt_tokens == len(tok.encode("hi")) + len(spelled)


def test_cluster_counts_an_inflight_request_once(server):
    body = {"prompt": "Count:", "max_tokens": 1500, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the connection (a disconnect)
            for line in lines:
                if line.startswith("data:") and '"text":"' in line:
                    break  # generating now
            info = server.cluster()
    assert info["gateway_inflight"] == 1 and info["generating"] == 1
