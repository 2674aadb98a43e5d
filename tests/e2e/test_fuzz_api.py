"""Seeded fuzzing of both endpoints against the real server (demo model): a few hundred requests,
each a valid body with one to three fields - any field, top level or inside a message - set to a
hostile value. No answer may be a 5xx (nor an error event inside a 200 stream), and the server
ends healthy with nothing held. Bounded: small max_tokens, values that cannot ask for long runs.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

SEED = 20261207
NUM_REQUESTS = 300
CONCURRENCY = 4


def nested(levels: int):
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


HOSTILE = [
    None, True, False, 0, -1, 1, 2, 2**31, 2**63, 2**64, -(2**64), 10**30, 1e308, -1e308, 1e-300, float("nan"),
    float("inf"), 0.5, "", "x", "\ud800", "a\udfffb", "<|im_end|>", "x" * 20000, [], [1], ["x"], [[1]], [None], {},
    {"a": 1}, {"type": "text", "text": "hi"}, nested(300),
]

SHARED_FIELDS = [
    "model", "temperature", "top_p", "n", "stream", "stream_options", "stop", "presence_penalty",
    "frequency_penalty", "seed", "user", "logit_bias", "top_k", "min_p", "repetition_penalty", "ignore_eos",
    "min_tokens", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output", "split_special_tokens",
    "max_tokens", "an_unknown_field",
]
CHAT_FIELDS = SHARED_FIELDS + [
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format",
    "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "chat_template",
    "messages.0.role", "messages.0.content", "messages.0.name", "messages.0.extra", "messages.0.content.0",
    "messages.0.content.0.type", "messages.0.content.0.text", "chat_template_kwargs.enable_thinking",
    "stream_options.include_usage",
]
COMPLETION_FIELDS = SHARED_FIELDS + ["prompt", "logprobs", "echo", "suffix", "best_of", "prompt.0"]

# Values that are valid but would ask for long generations are not fuzzed (the test stays quick).
BIG_VALID = {"max_tokens": (2, 5, 16), "max_completion_tokens": (2, 5), "min_tokens": (2, 5)}


def base_body(endpoint: str, rng: random.Random) -> dict:
    body = {"model": "demo", "max_tokens": 2, "temperature": rng.choice([0, 0.7])}
    if endpoint == "chat":
        content = rng.choice(["Hi", [{"type": "text", "text": "Hi"}]])
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = rng.choice(["Hi", ["Hi", "Yo"], [1, 2, 3]])
    return body


def set_path(body: dict, path: str, value) -> None:
    """Set `a.0.b`-style paths; a path through something that is not a container replaces it."""
    keys = path.split(".")
    node = body
    for key in keys[:-1]:
        child = node[int(key)] if isinstance(node, list) and key.isdigit() and int(key) < len(node) else (
            node.get(key) if isinstance(node, dict) else None)
        if not isinstance(child, (dict, list)):
            child = [{}] if keys[keys.index(key) + 1].isdigit() else {}
            if isinstance(node, list):
                node[int(key) if key.isdigit() and int(key) < len(node) else 0] = child
            else:
                node[key] = child
        node = child
    last = keys[-1]
    if isinstance(node, list):
        if node:
            node[int(last) % len(node) if last.isdigit() else 0] = value
        else:
            node.append(value)
    else:
        node[last] = value


def mutate(endpoint: str, rng: random.Random) -> dict:
    body = base_body(endpoint, rng)
    fields = CHAT_FIELDS if endpoint == "chat" else COMPLETION_FIELDS
    for field in rng.sample(fields, rng.randint(1, 3)):
        if rng.random() < 0.1 and field in body:
            del body[field]
            continue
        value = rng.choice(HOSTILE)
        if field in BIG_VALID and isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**6:
            value = rng.choice(BIG_VALID[field])
        set_path(body, field, value)
    return body


async def send(http: httpx.AsyncClient, endpoint: str, body: dict) -> tuple[int, str]:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    content = json.dumps(body, ensure_ascii=True)  # lone surrogates travel as escapes; NaN as NaN
    async with http.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        text = (await r.aread()).decode("utf-8", "replace")
    return r.status_code, text


def test_fuzzed_requests_never_get_a_5xx():
    rng = random.Random(SEED)
    cases = [(ep, mutate(ep, rng)) for ep in (rng.choice(["chat", "completions"]) for _ in range(NUM_REQUESTS))]
    with ServerProcess("--model", "demo", "--max-model-len", "1024", "--threads", "1") as server:
        async def run():
            sem = asyncio.Semaphore(CONCURRENCY)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
                async def one(ep, body):
                    async with sem:
                        return await send(http, ep, body)
                return await asyncio.gather(*(one(ep, body) for ep, body in cases))

        results = asyncio.run(run())
        bad = [(status, ep, json.dumps(body, ensure_ascii=True)[:300], text[:300])
               for (ep, body), (status, text) in zip(cases, results)
               if status >= 500 or (status == 200 and "internal_error" in text)]
        assert not bad, "\n".join(map(str, bad[:10]))
        statuses = {s for s, _ in results}
        assert 200 in statuses and 400 in statuses  # the fuzzer reaches both the valid and the invalid
        assert httpx.get(server.base_url + "/health").status_code == 200
        server.wait_idle()
