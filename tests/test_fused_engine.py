"""The bf16 fast path (fused AVX-512 ops, one paged attention call per layer for decode and
prefill alike) against the torch reference path, and its greedy output against batching,
chunked prefill and the prefix cache."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels import fused
from splitserve.models.llama import FusedOps, ReferenceOps
from tests.hf_models import write_tiny_model
from tests.test_model_vs_hf import make_engine, prompts_for

pytestmark = pytest.mark.skipif(not fused.kernels_available(), reason="AVX-512 extension unavailable")

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_root):
    return write_tiny_model(tiny_model_root, "llama")


def bf16_engine(path, **overrides):
    engine = make_engine(path, dtype="bfloat16", **overrides)
    assert engine.runner.model.ops is FusedOps
    return engine


def prefill_logits(engine, prompt: list[int]) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    model = engine.runner.model
    original = model.compute_logits

    def capture(hidden):
        logits = original(hidden)
        captured.append(logits)
        return logits

    model.compute_logits = capture
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    model.compute_logits = original
    return captured[-1][0]


@pytest.mark.parametrize("chunk", [None, 16])
def test_fused_prefill_matches_reference_ops(tiny_llama, chunk):
    overrides = {} if chunk is None else dict(max_num_batched_tokens=chunk)
    prompt = prompts_for(256, seed=3)[-1]  # 100 tokens: with 16-token chunks, 6 chunks attend to a cached prefix
    fused_engine = bf16_engine(tiny_llama, **overrides)
    reference_engine = bf16_engine(tiny_llama, **overrides)
    reference_engine.runner.model.ops = ReferenceOps
    got = prefill_logits(fused_engine, prompt)
    want = prefill_logits(reference_engine, prompt)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    assert cos > 0.999, cos
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    for e in (fused_engine, reference_engine):
        e.check_integrity()
        assert e.is_idle()


def test_fused_greedy_independent_of_batch_chunking_and_cache(tiny_llama):
    prompts = prompts_for(256, seed=5)
    alone = []
    for p in prompts:
        engine = bf16_engine(tiny_llama, enable_prefix_caching=False)
        alone.extend(engine.generate([p], GREEDY))
    batched = bf16_engine(tiny_llama, max_num_batched_tokens=16)
    assert batched.generate(prompts, GREEDY) == alone
    # Second pass: full blocks come from the prefix cache; the rest is prefilled against them.
    hits = batched.scheduler.block_manager.num_hit_tokens
    assert batched.generate(prompts, GREEDY) == alone
    assert batched.scheduler.block_manager.num_hit_tokens > hits
    batched.check_integrity()
    assert batched.is_idle()
