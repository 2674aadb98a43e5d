"""One streamed completion's token arrival times (the benchmarks' TTFT/TPOT and gap probes)."""

from __future__ import annotations

import json
import time


async def token_stamps(http, base_url: str, body: dict, stamps: list | None = None) -> list[float]:
    """perf_counter() at each streamed chunk that carries text, appended to `stamps` as they come
    (a caller may watch it grow); raises on an HTTP error or an error event."""
    stamps = [] if stamps is None else stamps
    async with http.stream("POST", base_url + "/v1/completions", json=dict(body, stream=True)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"the stream ended with an error: {chunk['error']}")
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    return stamps
