"""Greedy output is token-identical to Hugging Face transformers (float32), under every scheduling regime."""

from __future__ import annotations

import pytest
import torch

from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from tests.hf_models import TINY_FAMILIES, hf_greedy, write_tiny_model

NEW_TOKENS = 12
PROMPT_LENS = [1, 5, 17, 33, 64, 100]


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def family_case(request, tiny_model_root):
    from transformers import AutoModelForCausalLM

    path = write_tiny_model(tiny_model_root, request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = prompts_for(hf.config.vocab_size)
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    return path, prompts, expected


def make_engine(path: str, **overrides) -> LLMEngine:
    cfg = dict(model=path, dtype="float32", threads=2, max_model_len=256, block_size=4, num_kv_blocks=512)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg))


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

REGIMES = {
    "batched": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(num_kv_blocks=70, max_num_batched_tokens=64),
    "block-size-16": dict(block_size=16),
}


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_greedy_matches_transformers(family_case, regime):
    path, prompts, expected = family_case
    engine = make_engine(path, **REGIMES[regime])
    got = engine.generate(prompts, GREEDY)
    assert got == expected
    if regime == "preemption":
        assert engine.scheduler.num_preemptions > 0
    engine.check_integrity()
    assert engine.is_idle()


def test_prefix_cache_hits_keep_output_identical(family_case):
    path, prompts, expected = family_case
    engine = make_engine(path)
    assert engine.generate(prompts, GREEDY) == expected
    hits_before = engine.scheduler.block_manager.num_hit_tokens
    # Second pass: every prompt's full blocks come from the prefix cache.
    assert engine.generate(prompts, GREEDY) == expected
    assert engine.scheduler.block_manager.num_hit_tokens > hits_before
    # A prompt extending a cached one reuses its blocks and still matches a cold engine.
    longer = prompts[-1] + prompts[2]
    warm = engine.generate([longer], GREEDY)
    cold = make_engine(path, enable_prefix_caching=False).generate([longer], GREEDY)
    assert warm == cold
    engine.check_integrity()
    assert engine.is_idle()


def test_greedy_does_not_depend_on_batch(family_case):
    path, prompts, expected = family_case
    engine = make_engine(path)
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert alone == expected
    # Interleave a sampled request: greedy rows must not notice.
    noisy = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=7)
    mixed = engine.generate(prompts + [prompts[0]], [GREEDY] * len(prompts) + [noisy])
    assert mixed[: len(prompts)] == expected
    assert engine.is_idle()
