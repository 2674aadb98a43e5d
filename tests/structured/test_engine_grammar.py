"""Grammar-constrained decoding in the engine: the batch bitmask, compile off the step loop, the
compile cache, and matcher replay (what makes a handoff or failover resume exactly)."""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import pytest
import torch

from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampler import apply_token_bitmask
from splitserve.engine.sampling_params import SamplingParams
from splitserve.models.registry import demo_model_path
from splitserve.models.tokenizer import load_tokenizer
from splitserve.structured.grammar import choice_spec, json_schema_spec

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "n": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["name", "n"], "additionalProperties": False}


def test_bitmask_bans_exactly_the_unset_bits_of_the_masked_rows():
    logits = torch.zeros(3, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # row 0: tokens 0 and 2
    bitmask[1, 2] = 1 << 1  # row 2: token 65
    apply_token_bitmask(logits, [0, 2], bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(logits[1]).all()  # unconstrained row untouched
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [65]
    full = torch.zeros(2, 70)
    apply_token_bitmask(full, [0, 1], bitmask)
    assert torch.isfinite(full[1]).nonzero().flatten().tolist() == [65]


@pytest.fixture(scope="module")
def engine():
    e = LLMEngine(EngineConfig(model="demo", dtype="float32", threads=1, max_model_len=512, num_kv_blocks=64))
    yield e
    e.close()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(demo_model_path())


def _prompt(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def _run(engine, rid, prompt, params, output_token_ids=None):
    engine.add_request(rid, prompt, params, output_token_ids=output_token_ids)
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid and o.new_token is not None:
                out.append(o.new_token)
    return out


def test_sampled_json_validates_and_cache_compiles_once(engine, tok):
    spec = json_schema_spec(SCHEMA, "s")
    prompt = _prompt(tok, "A JSON record please.")
    compiled = engine.grammars.backend.num_compiled
    outs = engine.generate([prompt] * 4, [SamplingParams(max_tokens=60, temperature=1.0, seed=s, grammar=spec)
                                          for s in range(4)])
    for ids in outs:
        assert ids[-1] in engine.eos_token_ids
        jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)
    assert engine.grammars.backend.num_compiled - compiled == 1  # one compile, three copies
    assert engine.is_idle()
    engine.check_integrity()


def test_replayed_matcher_continues_exactly(engine, tok):
    """A failover re-placement: a fresh request given the tokens already generated continues them
    token for token (the matcher replays them before the next mask)."""
    spec = json_schema_spec(SCHEMA, "s")
    prompt = _prompt(tok, "Another record.")
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=123, grammar=spec)
    full = _run(engine, "whole", prompt, params)
    for cut in (1, 5, len(full) // 2):
        rest = _run(engine, f"resumed-{cut}", prompt, params, output_token_ids=full[:cut])
        assert full[:cut] + rest == full
    assert engine.is_idle()


def test_compile_runs_off_the_step_loop(engine, tok, monkeypatch):
    """While a grammar compiles, the request waits in COMPILING and other requests keep stepping."""
    backend = engine.grammars.backend
    gate = threading.Event()
    real = backend._compile

    def slow_compile(spec):
        gate.wait(30)
        return real(spec)

    monkeypatch.setattr(backend, "_compile", slow_compile)
    spec = choice_spec(["alpha", "beta", "gamma-unique"], "c")
    engine.add_request("plain", _prompt(tok, "Hi"), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.add_request("waits", _prompt(tok, "Pick one"), SamplingParams(max_tokens=8, temperature=0, grammar=spec))
    assert "waits" in engine.grammars.waiting
    steps = 0
    while engine.scheduler.has_unfinished():
        engine.step()
        steps += 1
    assert steps >= 8 and "waits" in engine.grammars.waiting  # "plain" finished, "waits" never stalled it
    gate.set()
    out = []
    deadline = time.time() + 30
    while engine.has_unfinished() and time.time() < deadline:
        out += [o.new_token for o in engine.step() if o.request_id == "waits" and o.new_token is not None]
    assert tok.decode(out) in ("alpha", "beta", "gamma-unique")
    assert engine.is_idle()


def test_abort_while_compiling_and_failed_compile(engine, tok, monkeypatch):
    backend = engine.grammars.backend
    gate = threading.Event()
    real = backend._compile
    monkeypatch.setattr(backend, "_compile", lambda spec: (gate.wait(30), real(spec))[1])
    engine.add_request("gone", _prompt(tok, "x"), SamplingParams(max_tokens=4, grammar=choice_spec(["q1"], "c")))
    assert not engine.is_idle()
    assert engine.abort_request("gone")
    assert engine.is_idle()
    gate.set()

    def broken(spec):
        raise ValueError("boom")

    monkeypatch.setattr(backend, "_compile", broken)
    engine.add_request("bad", _prompt(tok, "x"), SamplingParams(max_tokens=4, grammar=choice_spec(["q2"], "c")))
    deadline = time.time() + 30
    failures = []
    while not failures and time.time() < deadline:
        engine.step()
        failures = engine.grammars.take_failures()
    assert failures and failures[0][0] == "bad" and "boom" in failures[0][1]
    assert engine.is_idle()
    assert engine.grammars.backend.cache  # the earlier compiles stay cached
