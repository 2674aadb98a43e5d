"""Prompt logprobs (for `echo` with `logprobs`): the engine's log-softmax at every prompt position
equals transformers', whole or chunked, with a cached prefix, and with other requests in the batch."""

from __future__ import annotations

import pytest
import torch

from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from tests.hf_models import write_tiny_model

K = 3


@pytest.fixture(scope="module")
def tiny(tiny_model_root):
    from transformers import AutoModelForCausalLM

    path = write_tiny_model(tiny_model_root, "llama-tied")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row p: the distribution of token p + 1


def run(engine: LLMEngine, prompts: dict[str, list[int]], params: dict[str, SamplingParams]) -> dict:
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params[rid])
    got: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in got, "prompt logprobs sent twice"
                got[out.request_id] = out.prompt_logprobs
    engine.check_integrity()
    assert engine.is_idle()
    return got


@pytest.mark.parametrize("regime", [dict(), dict(max_num_batched_tokens=8), dict(block_size=16)])
def test_prompt_logprobs_match_transformers(tiny, regime):
    path, hf = tiny
    config = dict(model=path, dtype="float32", threads=2, max_model_len=128, block_size=4, num_kv_blocks=256)
    engine = LLMEngine(EngineConfig(**{**config, **regime}))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 384, (37,), generator=g).tolist()
    other = torch.randint(3, 384, (20,), generator=g).tolist()
    with_lp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=K)
    plain = SamplingParams(max_tokens=2, temperature=0.0)
    # a first run caches the prompt's blocks; the second must still compute (and report) every position
    for round_ in range(2):
        got = run(engine, {f"a{round_}": prompt, f"b{round_}": other}, {f"a{round_}": with_lp, f"b{round_}": plain})
        assert set(got) == {f"a{round_}"}
        entries = got[f"a{round_}"]
        assert [p for p, _ in entries] == list(range(1, len(prompt)))
        ref = hf_prompt_logprobs(hf, prompt)
        for p, lp in entries:
            assert lp.token_logprob == pytest.approx(ref[p - 1, prompt[p]].item(), abs=1e-4)
            top_vals, top_ids = torch.topk(ref[p - 1], K)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-4)


def test_prompt_logprobs_are_validated():
    with pytest.raises(ValueError, match="prompt logprobs"):
        SamplingParams(prompt_logprobs=21)
