"""Tiny random Hugging Face models (written once per session) used as references in tests."""

from __future__ import annotations

import os

import torch

TINY_FAMILIES = {
    # Llama 3.x style: llama3 rope scaling, GQA, untied.
    "llama": dict(cls="LlamaConfig", extra=dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                                  rope_theta=500000.0, tie_word_embeddings=False)),
    # SmolLM2 style: tied embeddings.
    "llama-tied": dict(cls="LlamaConfig", extra=dict(tie_word_embeddings=True)),
    "qwen2": dict(cls="Qwen2Config", extra=dict(tie_word_embeddings=False)),
    "qwen3": dict(cls="Qwen3Config", extra=dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": dict(cls="MistralConfig", extra=dict(sliding_window=4096, tie_word_embeddings=False)),
}
MODEL_CLASSES = {
    "LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM", "MistralConfig": "MistralForCausalLM",
}


def write_tiny_model(root: str, family: str, seed: int = 0) -> str:
    import transformers

    out = os.path.join(root, family)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    spec = TINY_FAMILIES[family]
    cfg_cls = getattr(transformers, spec["cls"])
    config = cfg_cls(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        **spec["extra"],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[spec["cls"]])(config).float().eval()
    # A wider init than the default gives peaked logits, so greedy choices are far from ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.15)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()
