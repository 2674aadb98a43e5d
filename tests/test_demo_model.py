"""The demo model (SmolLM2-135M-Instruct GGUF): greedy output identical to transformers loading the same file."""

from __future__ import annotations

import os

import pytest
import torch

from splitserve.config import EngineConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.models.registry import demo_model_path
from splitserve.models.tokenizer import load_tokenizer
from tests.hf_models import hf_greedy

pytestmark = pytest.mark.slow

NEW = 24
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who loved to read books. Every evening",
    "Q: What is the boiling point of water at sea level?\nA:",
]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    path = demo_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    tok = load_tokenizer(path)
    prompts = [tok.encode(t) for t in TEXTS]
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three colors."}]),
                      add_special_tokens=False)
    prompts.append(chat)
    return prompts, [hf_greedy(hf, p, NEW) for p in prompts]


@pytest.mark.parametrize("regime", [dict(), dict(max_num_batched_tokens=16, block_size=8)])
def test_demo_greedy_matches_transformers(reference, regime):
    prompts, expected = reference
    engine = LLMEngine(EngineConfig(model="demo", dtype="float32", threads=2, max_model_len=512,
                                    num_kv_blocks=256, **regime))
    got = engine.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    assert got == expected
    engine.check_integrity()
    assert engine.is_idle()
