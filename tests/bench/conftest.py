"""Fixtures for the bench tests: a scriptable fake OpenAI server on the test's event loop."""

from __future__ import annotations

import pytest

from splitserve.bench.fakeserver import FakeOpenAIServer, Script


@pytest.fixture
async def fake_server():
    """`srv = await fake_server(script)` starts a server; all are stopped at teardown."""
    servers: list[FakeOpenAIServer] = []

    async def start(script=None, **kwargs) -> FakeOpenAIServer:
        srv = FakeOpenAIServer(script or Script(), **kwargs)
        await srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        await srv.stop()
