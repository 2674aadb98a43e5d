"""Disaggregated streams under concurrency: the prefill worker's first token and the decode
worker's next ones travel on different sockets. The gateway delivers them in token order, so
concurrent greedy streams equal the same requests served one at a time."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from splitserve.testing import ServerProcess
from tests.cluster.conftest import PROMPTS, TINY_ARGS, stream_text

pytestmark = pytest.mark.slow


def test_concurrent_disaggregated_streams_equal_serial_ones(tiny_served):
    with ServerProcess("--model", tiny_served, *TINY_ARGS, "--disaggregated") as s:
        async def scenario():
            async with httpx.AsyncClient(timeout=300) as http:
                serial = {p: await stream_text(http, s.base_url, p, 48) for p in PROMPTS}
                out = []

                async def client(i: int) -> None:
                    for n in range(8):
                        p = PROMPTS[(i + n) % len(PROMPTS)]
                        out.append((p, await stream_text(http, s.base_url, p, 48)))
                await asyncio.gather(*(client(i) for i in range(4)))
                return serial, out

        serial, concurrent = asyncio.run(scenario())
        assert len(concurrent) == 32
        assert [p for p, text in concurrent if text != serial[p]] == []
        s.wait_idle()
