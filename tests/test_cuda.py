"""The CUDA path: greedy parity with transformers on the GPU, and a KV handoff from GPU memory.

Skipped without a GPU (CI has none); run on a lent GPU with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_greedy_matches_transformers(tiny_model_root):
    from transformers import AutoModelForCausalLM

    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams
    from tests.hf_models import write_tiny_model
    from tests.test_model_vs_hf import prompts_for

    path = write_tiny_model(tiny_model_root, "qwen3")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompts = prompts_for(hf.config.vocab_size)
    expected = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          min_new_tokens=10, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", device="cuda", max_model_len=256, block_size=16,
                                    num_kv_blocks=128))
    got = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert got == expected
    assert engine.is_idle()


def test_cuda_bf16_demo_runs_and_samples():
    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model="demo", dtype="bfloat16", device="cuda", max_model_len=1024))
    out = engine.generate([[1, 504, 3458, 282]] * 4, SamplingParams(max_tokens=16, temperature=0.8, seed=3))
    assert all(len(o) == 16 or o[-1] in engine.eos_token_ids for o in out)
    assert engine.is_idle()
