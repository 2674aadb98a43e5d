"""Failover keeps constrained output exact: a decode worker killed mid-stream, its request re-placed
with the tokens already streamed, the new matcher replays them, and the stream continues with no
gap and no duplicate, token-identical to an uninterrupted run (seeded sampling, JSON schema)."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import jsonschema
import pytest

from tests.e2e.test_disaggregated import _sse_texts
from tests.server_utils import ServerProcess, pid_alive

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 12, "maxItems": 12, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "word": {"type": "string", "maxLength": 8}},
    "required": ["id", "word"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False}


def test_kill_decode_worker_mid_constrained_stream():
    with ServerProcess("--model", "demo", "--dtype", "float32", "--max-model-len", "1024", "--threads", "1",
                       "--disaggregated") as s:
        body = {"prompt": "Twelve items as JSON:", "max_tokens": 400, "temperature": 1.0, "seed": 42, "stream": True,
                "structured_outputs": {"json": SCHEMA}}
        with httpx.Client(timeout=300) as http:
            expected = "".join(_sse_texts(http, s.base_url, body))
        jsonschema.validate(json.loads(expected), SCHEMA)
        victim = [w for w in s.cluster()["workers"] if w["role"] == "decode"][0]
        texts = []
        with httpx.Client(timeout=300) as http:
            for i, t in enumerate(_sse_texts(http, s.base_url, body)):
                texts.append(t)
                if i == 15:
                    os.kill(victim["pid"], signal.SIGKILL)
        assert "".join(texts) == expected
        assert not pid_alive(victim["pid"])
        assert s.cluster()["requests_replaced"] >= 1
        deadline = time.time() + 120
        while time.time() < deadline and [w for w in s.cluster()["workers"] if w["role"] == "decode"][0]["state"] != "ready":
            time.sleep(0.2)
        s.wait_idle(timeout=60)
