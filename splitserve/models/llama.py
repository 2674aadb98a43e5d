"""One Llama-architecture implementation for Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 and SmolLM2.

Differences between the families are configuration: GQA, qkv bias (Qwen2), per-head q/k RMSNorm
(Qwen3), rope scaling (llama3), tied embeddings. Weights are fused at load time (qkv, gate+up)
so a layer is four matrix products. Plain tensors, no nn.Module: nothing here trains.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from splitserve.kernels import fused
from splitserve.kernels.linear import prepare_linear
from splitserve.models.attention import AttentionMetadata, paged_attention
from splitserve.models.config import ModelArchConfig
from splitserve.models.rotary import RotaryEmbedding

LinearOp = Callable[[torch.Tensor], torch.Tensor]


class ReferenceOps:
    """The element-wise steps in plain torch, with transformers' arithmetic (exact in float32)."""

    fused_attention = False
    rms_norm = staticmethod(fused.rms_norm_ref)
    add_rms_norm = staticmethod(fused.add_rms_norm_ref)
    apply_rotary = staticmethod(fused.apply_rotary_ref)
    write_kv = staticmethod(fused.write_kv_ref)
    silu_mul = staticmethod(fused.silu_mul_ref)


class FusedOps:
    """The same steps as single AVX-512 kernels (bf16 on CPU): a decode step is otherwise
    hundreds of tiny torch calls whose dispatch costs as much as the matrix products."""

    fused_attention = True
    rms_norm = staticmethod(fused.rms_norm)
    add_rms_norm = staticmethod(fused.add_rms_norm)
    apply_rotary = staticmethod(fused.apply_rotary)
    write_kv = staticmethod(fused.write_kv)
    silu_mul = staticmethod(fused.silu_mul)


def select_ops(dtype: torch.dtype, device: torch.device):
    if dtype == torch.bfloat16 and device.type == "cpu" and fused.kernels_available():
        return FusedOps
    return ReferenceOps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return fused.rms_norm_ref(x, weight, eps)


class DecoderLayer:
    def __init__(self, cfg: ModelArchConfig, w: dict[str, torch.Tensor]) -> None:
        self.eps = cfg.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.input_norm = w["input_layernorm.weight"]
        self.post_norm = w["post_attention_layernorm.weight"]
        qkv_w = torch.cat([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]])
        qkv_b = None
        if cfg.qkv_bias:
            qkv_b = torch.cat([w["self_attn.q_proj.bias"], w["self_attn.k_proj.bias"], w["self_attn.v_proj.bias"]])
        self.qkv: LinearOp = prepare_linear(qkv_w, qkv_b)
        self.o_proj: LinearOp = prepare_linear(w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        self.q_norm = w.get("self_attn.q_norm.weight") if cfg.qk_norm else None
        self.k_norm = w.get("self_attn.k_norm.weight") if cfg.qk_norm else None
        self.intermediate = cfg.intermediate_size
        self.gate_up: LinearOp = prepare_linear(torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]), None)
        self.down: LinearOp = prepare_linear(w["mlp.down_proj.weight"], None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """x: this layer's normalised input; returns (MLP output, residual after attention).
        The caller adds the MLP output to the residual, fused with the next norm."""
        T = x.shape[0]
        qkv = self.qkv(x)
        q = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = ops.rms_norm(q, self.q_norm, self.eps)
            k = ops.rms_norm(k, self.k_norm, self.eps)
        q, k = ops.apply_rotary(q, k, cos, sin)
        k_cache, v_cache = kv
        ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, ops.fused_attention)
        x, residual = ops.add_rms_norm(self.o_proj(attn.view(T, self.q_size)), residual, self.post_norm, self.eps)
        return self.down(ops.silu_mul(self.gate_up(x))), residual


class LlamaModel:
    def __init__(self, cfg: ModelArchConfig, weights: Iterable[tuple[str, torch.Tensor]],
                 dtype: torch.dtype, device: torch.device, max_positions: int) -> None:
        self.cfg = cfg
        self.dtype, self.device = dtype, device
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in range(cfg.num_layers)]
        top: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            tensor = tensor.to(device=device, dtype=dtype)
            if name.startswith("model.layers."):
                idx, rest = name[len("model.layers."):].split(".", 1)
                per_layer[int(idx)][rest] = tensor
            else:
                top[name] = tensor
        self.embed = top["model.embed_tokens.weight"]
        self.norm = top["model.norm.weight"]
        lm_head = self.embed if cfg.tie_word_embeddings or "lm_head.weight" not in top else top["lm_head.weight"]
        self.lm_head: LinearOp = prepare_linear(lm_head, None)
        self.layers = [DecoderLayer(cfg, w) for w in per_layer]
        self.rotary = RotaryEmbedding(cfg, max_positions, dtype, device)
        self.ops = select_ops(dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], layer_hook=None) -> torch.Tensor:
        """`layer_hook(i)` runs after layer i wrote its KV: the prefill side of a KV handoff
        ships that layer while the next ones compute."""
        ops = self.ops
        residual = F.embedding(input_ids, self.embed)
        x = ops.rms_norm(residual, self.layers[0].input_norm, self.cfg.rms_norm_eps)
        cos, sin = self.rotary.lookup(positions)
        last = len(self.layers) - 1
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            out, residual = layer.forward(x, residual, cos, sin, kv, meta, ops)
            next_norm = self.layers[i + 1].input_norm if i < last else self.norm
            x, residual = ops.add_rms_norm(out, residual, next_norm, self.cfg.rms_norm_eps)
            if layer_hook is not None:
                layer_hook(i)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
