"""Model catalog for the simulator: shapes, not weights. Numbers from each model's config.json.

A `ModelSpec` is enough to count parameters, FLOPs and bytes per step: layers, hidden size,
attention heads (grouped-query or MLA), MLP or mixture-of-experts sizes, vocabulary. Any Hugging
Face config.json of a Llama/Qwen/Mistral, Qwen-MoE, DeepSeek-V3 or gpt-oss model also works.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

DTYPE_BYTES = {
    "fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0,
    "fp8": 1.0, "int8": 1.0, "8bit": 1.0, "fp6": 0.75, "fp4": 0.5, "mxfp4": 0.53125, "int4": 0.5,
}
# The dtype the matmuls run in, for the compute peak: 8-bit weights with 8-bit activations run
# on FP8/INT8 units; 4-bit weights on FP4 units where they exist.
COMPUTE_DTYPE = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "bf16",
                 "float16": "bf16", "fp8": "fp8", "int8": "fp8", "8bit": "fp8", "fp6": "fp8",
                 "fp4": "fp4", "mxfp4": "fp4", "int4": "fp4"}


def dtype_bytes(name: str) -> float:
    key = name.lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP (and dense layers of MoE models)
    vocab_size: int
    tie_word_embeddings: bool = False
    # Mixture of experts (num_experts == 0: dense)
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    first_dense_layers: int = 0  # DeepSeek: the first k layers use a dense MLP
    # Multi-head latent attention (DeepSeek-V2/V3): KV cache of kv_lora_rank + rope dims per layer
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    max_context: int = 131072
    mlp_matrices: int = 3  # gated MLP (gate, up, down); 2 for a plain fc1/fc2 MLP (OPT, GPT-J)
    parallel_attention: bool = False  # attention and MLP side by side on one input (Falcon, GPT-J)
    default_dtype: str = "bf16"
    source: str = ""
    aliases: tuple[str, ...] = ()

    # ---- structure -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def attn_params(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk) if self.q_lora_rank \
                else h * self.num_heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + \
                self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            o = self.num_heads * self.v_head_dim * h
            return q + kv + o
        d = self.head_dim
        return h * d * (2 * self.num_heads + 2 * self.num_kv_heads)

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def dense_mlp_params(self) -> int:
        return self.mlp_matrices * self.hidden_size * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def layer_params(self, active: bool) -> float:
        """Parameters of all layers (attention + MLP/experts), total or active per token."""
        dense = self.num_layers - self.num_moe_layers
        total = self.num_layers * self.attn_params + dense * self.dense_mlp_params
        if self.is_moe:
            k = self.experts_per_token if active else self.num_experts
            per = (k + self.num_shared_experts) * self.expert_params + self.hidden_size * self.num_experts
            total += self.num_moe_layers * per
        return float(total)

    @property
    def total_params(self) -> float:
        emb = self.embedding_params * (1 if self.tie_word_embeddings else 2)
        return self.layer_params(active=False) + emb

    @property
    def active_params(self) -> float:
        emb = self.embedding_params * (1 if self.tie_word_embeddings else 2)
        return self.layer_params(active=True) + emb

    # ---- per-token sizes -------------------------------------------------------------------
    def kv_elements_per_token(self) -> int:
        """KV-cache elements per token, all layers."""
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> float:
        return self.kv_elements_per_token() * dtype_bytes(kv_dtype)

    def attn_flops_per_pair(self) -> float:
        """FLOPs of one (query token, key token) pair, all layers: QK^T and PV."""
        if self.is_mla:  # absorbed MLA: scores over (kv_lora_rank + rope) dims, values over kv_lora_rank
            return 2.0 * self.num_layers * self.num_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return 4.0 * self.num_layers * self.num_heads * self.head_dim

    def weight_bytes(self, weight_dtype: str) -> float:
        return self.total_params * dtype_bytes(weight_dtype)


def _llama(name, layers, hidden, heads, kv, inter, vocab, *, head_dim=None, tie=False, ctx=131072,
           source="", aliases=()):
    return ModelSpec(name, layers, hidden, heads, kv, head_dim or hidden // heads, inter, vocab, tie,
                     max_context=ctx, source=source, aliases=aliases)


_CATALOG: list[ModelSpec] = [
    _llama("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256,
           source="meta-llama/Llama-3.1-8B config.json", aliases=("llama3.1-8b", "llama-8b", "8b")),
    _llama("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256,
           source="meta-llama/Llama-3.1-70B config.json", aliases=("llama3.1-70b", "llama-70b", "70b")),
    _llama("llama-3.1-405b", 126, 16384, 128, 8, 53248, 128256,
           source="meta-llama/Llama-3.1-405B config.json", aliases=("llama3.1-405b", "llama-405b", "405b")),
    _llama("llama-3.3-70b", 80, 8192, 64, 8, 28672, 128256,
           source="meta-llama/Llama-3.3-70B-Instruct config.json", aliases=("llama3.3-70b",)),
    _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, ctx=4096,
           source="meta-llama/Llama-2-7b-hf config.json (TensorRT-LLM's 'LLaMA 7B' benchmark)", aliases=("llama2-7b",)),
    _llama("llama-3.2-1b", 16, 2048, 32, 8, 8192, 128256, head_dim=64, tie=True,
           source="meta-llama/Llama-3.2-1B config.json (a draft model for speculative decoding)",
           aliases=("llama3.2-1b",)),
    _llama("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, ctx=4096,
           source="meta-llama/Llama-2-70b-hf config.json (MLPerf Inference's Llama-2-70B)",
           aliases=("llama2-70b",)),
    _llama("qwen3-32b", 64, 5120, 64, 8, 25600, 151936, head_dim=128, ctx=40960,
           source="Qwen/Qwen3-32B config.json"),
    ModelSpec("qwen3-235b-a22b", 94, 4096, 64, 4, 128, 12288, 151936, num_experts=128, experts_per_token=8,
              moe_intermediate_size=1536, max_context=40960, source="Qwen/Qwen3-235B-A22B config.json",
              aliases=("qwen3-235b",)),
    ModelSpec("gpt-oss-120b", 36, 2880, 64, 8, 64, 2880, 201088, num_experts=128, experts_per_token=4,
              moe_intermediate_size=2880, max_context=131072, default_dtype="mxfp4",
              source="openai/gpt-oss-120b config.json (MoE weights in MXFP4; sliding-window layers "
                     "are modelled as full attention)", aliases=("gptoss-120b",)),
    ModelSpec("deepseek-v3", 61, 7168, 128, 128, 128, 18432, 129280, num_experts=256, experts_per_token=8,
              moe_intermediate_size=2048, num_shared_experts=1, first_dense_layers=3, kv_lora_rank=512,
              q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
              default_dtype="fp8", source="deepseek-ai/DeepSeek-V3 config.json (FP8 weights)",
              aliases=("deepseek-r1", "dsv3")),
    # OPT (DistServe's models): multi-head attention, a plain ReLU fc1/fc2 MLP of 4 x hidden, tied
    # embeddings (learned position embeddings, 2k x hidden, left out: under 0.1% of the weights)
    ModelSpec("opt-13b", 40, 5120, 40, 40, 128, 20480, 50272, True, max_context=2048, mlp_matrices=2,
              source="facebook/opt-13b config.json (DistServe, OSDI 2024)"),
    ModelSpec("opt-66b", 64, 9216, 72, 72, 128, 36864, 50272, True, max_context=2048, mlp_matrices=2,
              source="facebook/opt-66b config.json (DistServe, OSDI 2024)"),
    ModelSpec("falcon-180b", 80, 14848, 232, 8, 64, 59392, 65024, False, max_context=2048, mlp_matrices=2,
              parallel_attention=True,
              source="tiiuae/falcon-180B config.json (new decoder architecture: parallel attention and GELU MLP; "
                     "TensorRT-LLM's 2023 benchmark model)"),
    _llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152, tie=True, ctx=8192,
           source="HuggingFaceTB/SmolLM2-135M config.json (the demo model)",
           aliases=("demo", "smollm2-135m-instruct")),
]

MODELS: dict[str, ModelSpec] = {m.name: m for m in _CATALOG}
_ALIASES = {a: m.name for m in _CATALOG for a in m.aliases}


def from_hf_config(cfg: dict, name: str = "custom") -> ModelSpec:
    """A Hugging Face config.json dict -> ModelSpec (Llama-like, Qwen-MoE, DeepSeek-V2/V3, gpt-oss)."""
    g = cfg.get
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        cfg = {**cfg["text_config"]}
        g = cfg.get
    try:
        hidden = int(g("hidden_size"))
        layers = int(g("num_hidden_layers"))
        heads = int(g("num_attention_heads"))
        vocab = int(g("vocab_size"))
    except (TypeError, ValueError):
        raise ValueError("config.json needs hidden_size, num_hidden_layers, num_attention_heads, vocab_size") from None
    kv = int(g("num_key_value_heads") or heads)
    head_dim = int(g("head_dim") or hidden // heads)
    inter = int(g("intermediate_size") or 4 * hidden)
    experts = int(g("n_routed_experts") or g("num_local_experts") or g("num_experts") or 0)
    topk = int(g("num_experts_per_tok") or g("experts_per_token") or g("num_experts_per_token") or 0)
    moe_inter = int(g("moe_intermediate_size") or (inter if experts else 0))
    shared = int(g("n_shared_experts") or 0)
    first_dense = int(g("first_k_dense_replace") or 0)
    kv_lora = int(g("kv_lora_rank") or 0)
    dtype = "bf16"
    q = g("quantization_config") or {}
    if isinstance(q, dict):
        method = str(q.get("quant_method", "")).lower()
        if method == "fp8":
            dtype = "fp8"
        elif method == "mxfp4":
            dtype = "mxfp4"
    return ModelSpec(
        name, layers, hidden, heads, kv, head_dim, inter, vocab, bool(g("tie_word_embeddings", False)),
        num_experts=experts, experts_per_token=topk if experts else 0, moe_intermediate_size=moe_inter,
        num_shared_experts=shared, first_dense_layers=first_dense if experts else 0,
        kv_lora_rank=kv_lora, q_lora_rank=int(g("q_lora_rank") or 0),
        qk_rope_head_dim=int(g("qk_rope_head_dim") or 0), qk_nope_head_dim=int(g("qk_nope_head_dim") or 0),
        v_head_dim=int(g("v_head_dim") or 0), max_context=int(g("max_position_embeddings") or 4096),
        default_dtype=dtype, source="config.json",
    )


def get_model(name: str) -> ModelSpec:
    """A catalog name or alias, a config.json file, or a directory holding one."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in MODELS:
        return MODELS[key]
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path) and path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        base = os.path.basename(os.path.dirname(os.path.abspath(path))) or "custom"
        return from_hf_config(cfg, base)
    raise ValueError(f"unknown model {name!r}; `splitserve models` lists {', '.join(MODELS)}, "
                     "or pass a config.json")
