from __future__ import annotations

import openai
import pytest

from tests.server_utils import ServerProcess

COMMON = ("--model", "demo", "--dtype", "float32", "--max-model-len", "1024", "--threads", "1")
MODES = {"aggregated": (), "disaggregated": ("--disaggregated",)}


@pytest.fixture(scope="module", params=list(MODES))
def server(request):
    """A real server per mode (module-scoped), with an official openai client attached."""
    with ServerProcess(*COMMON, *MODES[request.param]) as s:
        s.mode = request.param
        s.client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        yield s
