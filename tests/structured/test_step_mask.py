"""The fast paths of constrained sampling against the general ones: the bitmask applied through a
byte table against unpacking it bit by bit, and each step's mask computed on the mask thread while
the forward pass runs against computing it before sampling, step by step, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampler import apply_token_bitmask
from splitserve.engine.sampling_params import SamplingParams
from splitserve.models.registry import demo_model_path
from splitserve.models.tokenizer import load_tokenizer
from splitserve.structured.grammar import choice_spec, json_schema_spec, regex_spec

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
    "n": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["name", "tags", "n"], "additionalProperties": False}


def reference_apply(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """The general path: unpack every bit, ban the unset ones with masked_fill."""
    vocab = logits.shape[1]
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little", count=vocab)
    banned = torch.from_numpy(allowed).view(torch.bool).logical_not()
    for i, r in enumerate(rows):
        logits[r].masked_fill_(banned[i], float("-inf"))


def _special_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    picks = torch.randint(0, vocab, (rows, 6), generator=g)
    for r in range(rows):  # signed zeros and infinities must come through exactly
        x[r, picks[r, 0]], x[r, picks[r, 1]] = 0.0, -0.0
        x[r, picks[r, 2]], x[r, picks[r, 3]] = float("inf"), float("-inf")
    return x


@pytest.mark.parametrize("vocab", [70, 257, 49152, 49157])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_apply_matches_bit_by_bit_reference(vocab, dtype):
    words = (vocab + 31) // 32
    g = torch.Generator().manual_seed(vocab)
    for rows in ([0, 1, 2, 3, 4], [1, 3], [4], []):
        logits = _special_logits(5, vocab, dtype, seed=len(rows))
        bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), dtype=torch.int32, generator=g)
        if rows:
            bitmask[0] = 0  # nothing allowed
            bitmask[-1, :] = -1  # everything allowed
        fast, ref = logits.clone(), logits.clone()
        apply_token_bitmask(fast, rows, bitmask)
        reference_apply(ref, rows, bitmask)
        # bit for bit: -0.0 stays -0.0, +inf allowed stays +inf
        assert torch.equal(fast.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.fixture(scope="module")
def engine():
    # no prefix cache: a second run of the same prompts must be planned step for step like the first
    e = LLMEngine(EngineConfig(model="demo", dtype="float32", threads=1, max_model_len=512, num_kv_blocks=128,
                               enable_prefix_caching=False))
    yield e
    e.close()


def _workload(tok) -> list[tuple[list[int], SamplingParams]]:
    def prompt(text):
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)

    json_spec = json_schema_spec(SCHEMA, "s")
    out = []
    for i in range(4):  # seeded JSON, greedy JSON, a choice, a regex, and unconstrained rows between them
        out.append((prompt(f"Record {i} as JSON."), SamplingParams(max_tokens=40, temperature=1.0, seed=i,
                                                                  grammar=json_spec)))
        out.append((prompt(f"Say something {i}."), SamplingParams(max_tokens=12, temperature=0.8, seed=50 + i)))
    out.append((prompt("A JSON record."), SamplingParams(max_tokens=40, temperature=0.0, grammar=json_spec)))
    out.append((prompt("Pick."), SamplingParams(max_tokens=8, temperature=1.0, seed=7,
                                                grammar=choice_spec(["red", "green", "blue"], "c"))))
    out.append((prompt("A date."), SamplingParams(max_tokens=16, temperature=1.0, seed=9,
                                                  grammar=regex_spec(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", "r"))))
    return out


def _run_recording(engine, workload, overlap: bool, monkeypatch) -> tuple[list, dict[str, list[int]]]:
    """Run the workload to the end; return each step's bitmask and every request's tokens."""
    backend = engine.grammars.backend
    masks = []
    real = type(backend).advance_and_fill

    def recording(self, states, new_tokens):
        bitmask = real(self, states, new_tokens)
        masks.append(bitmask.clone())
        return bitmask

    monkeypatch.setattr(type(backend), "advance_and_fill", recording)
    monkeypatch.setattr(engine.grammars, "overlap", overlap)
    ids = [f"{'o' if overlap else 's'}{i}" for i in range(len(workload))]
    for rid, (prompt, params) in zip(ids, workload):
        engine.add_request(rid, prompt, params, seed=params.seed)
    tokens = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            if o.new_token is not None:
                tokens[o.request_id].append(o.new_token)
        engine.check_integrity()
    monkeypatch.undo()
    return masks, [tokens[rid] for rid in ids]


def test_overlapped_mask_matches_the_general_path_step_by_step(engine, monkeypatch):
    tok = load_tokenizer(demo_model_path())
    workload = _workload(tok)
    general_masks, general_tokens = _run_recording(engine, workload, False, monkeypatch)
    fast_masks, fast_tokens = _run_recording(engine, workload, True, monkeypatch)
    assert len(general_masks) == len(fast_masks) > 10
    for step, (a, b) in enumerate(zip(general_masks, fast_masks)):
        assert torch.equal(a, b), f"step {step}: masks differ"
    assert fast_tokens == general_tokens
    for (prompt, params), out in zip(workload, fast_tokens):
        assert out, "every request produced tokens"
    assert engine.is_idle()
    engine.check_integrity()


def test_a_failed_forward_leaves_no_mask_running(engine, monkeypatch):
    """If the forward pass raises, the step waits for the mask thread before the error goes up, so
    the matchers are never used by two threads; the request then continues exactly."""
    tok = load_tokenizer(demo_model_path())
    prompt, params = _workload(tok)[0]
    expected = engine.generate([prompt], [params])[0]
    real_forward = engine.model.forward
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("forward failed")
        return real_forward(*args, **kw)

    monkeypatch.setattr(engine.model, "forward", flaky)
    engine.add_request("flaky", prompt, params, seed=params.seed)
    out = []
    with pytest.raises(RuntimeError, match="forward failed"):
        while engine.has_unfinished():
            out += [o.new_token for o in engine.step() if o.new_token is not None]
    state = engine.scheduler.requests["flaky"].grammar
    assert state.num_consumed == len(out)  # the mask thread finished advancing it
    while engine.has_unfinished():  # the failed step's plan is simply computed again
        out += [o.new_token for o in engine.step() if o.new_token is not None]
    assert out == expected
    assert engine.is_idle()
