"""A tiny random model with the demo's tokenizer that a real server serves in a second or two:
for cluster tests about workers, not about the model's output quality."""

from __future__ import annotations

import json
import os


def write_tiny_served_model(root: str, seed: int = 0) -> str:
    import torch
    import transformers

    from splitserve.models.registry import demo_model_path
    from splitserve.models.tokenizer import load_tokenizer

    out = os.path.join(root, "tiny-served")
    if os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        return out
    tok = load_tokenizer(demo_model_path())
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # a wider init: peaked logits, so greedy choices are far from ties
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        f.write(tok.backend.to_str())
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": tok.bos_token, "eos_token": tok.eos_token}, f)
    return out
