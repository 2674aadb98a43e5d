"""A decode worker whose grammar compile outlasts the prefill: the request's KV is all there, so it
waits parked (holding its blocks) while the worker's other requests keep stepping, and starts the
step after its compile ends, token-identical to an aggregated run; a compile that outlasts the
deadline fails the request with a clear error and frees its blocks. Never a stalled step."""

from __future__ import annotations

import os
import threading

import pytest

from splitserve.engine.request import RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.models.registry import demo_model_path
from splitserve.models.tokenizer import load_tokenizer
from splitserve.structured.gate import MAX_COMPILE_S
from splitserve.structured.grammar import json_schema_spec
from tests.kv_pair import Pair, no_leftover_shared_memory  # noqa: F401 (fixture)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 99}},
          "required": ["city", "rank"], "additionalProperties": False}
PLAIN = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
SEED = 11  # what Pair.reserve uses


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(demo_model_path())

    def chat(text):
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)

    return chat("A city and its rank, as JSON."), chat("Count slowly from one.")


def _blocked_compile(monkeypatch, engine) -> threading.Event:
    """The engine's grammar compiles wait for the returned event (one that outlasts the prefill)."""
    backend = engine.grammars.backend
    release = threading.Event()
    real = backend._compile
    monkeypatch.setattr(backend, "_compile", lambda spec: (release.wait(120), real(spec))[1])
    return release


def _prefill_and_land(pair, rid, prompt, params) -> int:
    """Reserve on D, prefill on P, deliver every chunk and the done notice to D; P's first token."""
    pair.reserve(rid, prompt, params)
    pair.P.add_prefill_request(rid, prompt, params, SEED, "D", 0, pair.transport, dest_pid=os.getpid())
    first = []
    while pair.P.has_unfinished():
        first += [o.new_token for o in pair.P.step() if o.request_id == rid]
        pair.release_placements()
    pair.flush()
    assert len(first) == 1
    return first[0]


def _step_d(pair, outputs) -> None:
    assert not pair.D.poll_transfers()
    for o in pair.D.step():
        if o.new_token is not None:
            outputs.setdefault(o.request_id, []).append(o.new_token)
    pair.D.check_integrity()


def test_decode_request_waits_parked_while_others_step(prompts, monkeypatch):
    json_prompt, plain_prompt = prompts
    params = SamplingParams(max_tokens=24, temperature=1.0, grammar=json_schema_spec(SCHEMA, "s"))
    pair = Pair("demo", d_kw=dict(max_model_len=512))
    # the reference: the same request aggregated (on P, whose compiles are not held)
    pair.P.add_request("ref", json_prompt, params, seed=SEED)
    expected = []
    while pair.P.has_unfinished():
        expected += [o.new_token for o in pair.P.step() if o.new_token is not None]
    release = _blocked_compile(monkeypatch, pair.D)
    try:
        outputs = {}
        pair.D.add_request("plain", plain_prompt, PLAIN)
        outputs["json"] = [_prefill_and_land(pair, "json", json_prompt, params)]
        for _ in range(5):
            _step_d(pair, outputs)
        req = pair.D.scheduler.requests["json"]
        assert "json" in pair.D.grammars.waiting and req.status is RequestStatus.WAITING_FOR_KV
        assert len(outputs["plain"]) >= 5  # the other request never waited for the compile
        assert outputs["json"] == expected[:1]  # nothing sampled without its grammar
        release.set()
        while pair.D.has_unfinished():
            _step_d(pair, outputs)
    finally:
        release.set()
    assert outputs["json"] == expected
    assert len(outputs["plain"]) == PLAIN.max_tokens
    assert not pair.D.grammars.take_failures()
    pair.assert_clean()


def test_compile_past_the_deadline_fails_the_request_and_frees_its_blocks(prompts, monkeypatch):
    json_prompt, plain_prompt = prompts
    params = SamplingParams(max_tokens=24, temperature=1.0, grammar=json_schema_spec(SCHEMA, "s"))
    pair = Pair("demo", d_kw=dict(max_model_len=512))
    release = _blocked_compile(monkeypatch, pair.D)
    try:
        free_before = pair.D.scheduler.block_manager.num_free_blocks
        outputs = {}
        pair.D.add_request("plain", plain_prompt, PLAIN)
        _prefill_and_land(pair, "json", json_prompt, params)
        _step_d(pair, outputs)
        assert "json" in pair.D.grammars.waiting
        pair.now += MAX_COMPILE_S + 1  # the handoff's clock and the gate's
        _step_d(pair, outputs)
        failures = pair.D.grammars.take_failures()
        assert [(rid, queue_full) for rid, _, queue_full in failures] == [("json", False)]
        assert f"did not finish within {MAX_COMPILE_S:g} s" in failures[0][1]
        assert "json" not in pair.D.scheduler.requests and "json" not in pair.D.grammars.waiting
        while pair.D.has_unfinished():
            _step_d(pair, outputs)
        assert len(outputs["plain"]) == PLAIN.max_tokens
        assert pair.D.scheduler.block_manager.num_free_blocks == free_before
    finally:
        release.set()
    pair.assert_clean()


def test_abort_while_parked_frees_the_blocks(prompts, monkeypatch):
    json_prompt, _ = prompts
    params = SamplingParams(max_tokens=24, temperature=1.0, grammar=json_schema_spec(SCHEMA, "s"))
    pair = Pair("demo", d_kw=dict(max_model_len=512))
    release = _blocked_compile(monkeypatch, pair.D)
    try:
        free_before = pair.D.scheduler.block_manager.num_free_blocks
        _prefill_and_land(pair, "json", json_prompt, params)
        _step_d(pair, {})
        assert "json" in pair.D.grammars.waiting
        assert pair.D.abort_request("json")
        assert not pair.D.grammars.waiting and not pair.D.scheduler.requests
        assert pair.D.scheduler.block_manager.num_free_blocks == free_before
        assert pair.D.is_idle() and not pair.D.grammars.take_failures()
    finally:
        release.set()
    pair.assert_clean()
