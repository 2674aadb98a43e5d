"""Architecture description of a Llama-family model, read from config.json or GGUF metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# Hugging Face architecture name -> our family name. One implementation serves them all.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArchConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.rope_scaling.rope_type not in ("default", "linear", "llama3"):
            raise NotImplementedError(f"rope scaling {self.rope_scaling.rope_type!r} is not supported")

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * self.intermediate_size
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + emb + h

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelArchConfig":
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        eos = cfg.get("eos_token_id")
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id", eos)
        return cls.from_hf_dict(cfg, eos)

    @classmethod
    def from_hf_dict(cls, cfg: dict, eos=None) -> "ModelArchConfig":
        archs = cfg.get("architectures") or []
        family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if family is None:
            family = cfg.get("model_type")
            if family not in HF_ARCHITECTURES.values():
                raise NotImplementedError(f"unsupported architecture {archs or family!r}")
        heads = cfg["num_attention_heads"]
        # transformers 5 moved rope settings into `rope_parameters`; older configs use rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        rope.update(cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rtype,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
        eos = cfg.get("eos_token_id") if eos is None else eos
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        use_window = cfg.get("use_sliding_window", family == "mistral")
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else bias,
            o_bias=bias and family != "qwen2",
            qk_norm=family == "qwen3",
            sliding_window=cfg.get("sliding_window") if use_window else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict, tensor_names) -> "ModelArchConfig":
        arch = meta["general.architecture"]
        if arch not in GGUF_ARCHITECTURES:
            raise NotImplementedError(f"unsupported GGUF architecture {arch!r}")

        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        hidden = get("embedding_length")
        heads = get("attention.head_count")
        head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
        vocab = get("vocab_size") or len(meta["tokenizer.ggml.tokens"])
        names = set(tensor_names)
        scaling = RopeScaling()
        if get("rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor", 1.0)))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(t for t in (eos, eot) if t is not None)
        return cls(
            family=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=get("context_length", 4096),
            tie_word_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            sliding_window=None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        )
