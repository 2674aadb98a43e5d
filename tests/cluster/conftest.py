from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.served_models import write_tiny_served_model

# The tiny model in float32, one thread per worker: workers start in a second or two.
TINY_ARGS = ("--dtype", "float32", "--threads", "1", "--max-model-len", "1024")
PROMPTS = [f"Request number {i}: tell me a story about the sea and the ships on it." for i in range(8)]


@pytest.fixture(scope="session")
def tiny_served(tiny_model_root):
    return write_tiny_served_model(tiny_model_root)


def completion(base_url: str, prompt: str, max_tokens: int = 32, headers: dict | None = None) -> str:
    r = httpx.post(base_url + "/v1/completions", headers=headers or {}, timeout=300,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def stream_text(http: httpx.AsyncClient, base_url: str, prompt: str, max_tokens: int, on_token=None) -> str:
    """A greedy streamed completion's text; any error event fails the test."""
    import json

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    parts = []
    async with http.stream("POST", base_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    parts.append(chunk["choices"][0]["text"])
                    if on_token is not None:
                        on_token(len(parts))
    return "".join(parts)


async def async_wait_for(what, timeout: float = 120.0, step: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = await asyncio.to_thread(what)
        if got:
            return got
        await asyncio.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")
