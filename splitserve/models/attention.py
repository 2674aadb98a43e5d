"""Attention over a paged KV cache.

The runner orders a step's tokens as: decode tokens first, then prefill chunks. The fused path
(bf16 on CPU) treats every token as one query over its request's paged context (one kernel call
per layer). The torch reference path batches decodes into one padded call and runs one causal
SDPA call per prefill chunk. The KV cache of a layer is a flat [num_slots, kv_heads, head_dim]
pair; slot = block * block_size + offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    q_start: int  # row of the chunk's first token in the step's flattened tokens
    q_end: int
    context_start: int  # tokens of this request already in the cache before the chunk
    context_slots: torch.Tensor | None  # slots of tokens [0, context_start + n); None when context_start == 0
    mask: torch.Tensor | None  # [n, context_start + n] bool, None when context_start == 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_slots: torch.Tensor | None  # [B, L] slots of each decode request's context (padded)
    decode_padding: torch.Tensor | None  # [B, 1, 1, L] True where a slot is padding
    prefills: list[PrefillChunk]
    # For the fused paged kernel, which reads the cache through block tables (no gather), every
    # token of the step (decode or prefill) is one query row:
    token_block_tables: torch.Tensor | None = None  # [T, max_blocks] int32, the row's request's table
    token_context_lens: torch.Tensor | None = None  # [T] int32: position + 1 (causal by construction)
    block_size: int = 16


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slots: torch.Tensor, padding: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per request against its padded context. q: [B, Hq, D] -> [B, Hq, D].

    Explicit matmuls over [B, kv_heads, group, D] beat SDPA here: SDPA's CPU kernel is tuned for
    long queries and, with GQA, repeats K/V per query head.
    """
    B, Hq, D = q.shape
    L = slots.shape[1]
    Hk = k_cache.shape[1]
    flat = slots.reshape(-1)
    k = k_cache.index_select(0, flat).view(B, L, Hk, D).permute(0, 2, 3, 1)  # [B, Hk, D, L]
    v = v_cache.index_select(0, flat).view(B, L, Hk, D).transpose(1, 2)  # [B, Hk, L, D]
    scores = torch.matmul(q.view(B, Hk, Hq // Hk, D), k).float() * scale
    scores.masked_fill_(padding.view(B, 1, 1, L), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(B, Hq, D)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hk, D] (this step's keys, already written to the cache)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [S, Hk, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    fused: bool = False,
) -> torch.Tensor:
    if fused:
        from splitserve.kernels.fused import paged_decode_attention

        # The step's K/V are already in the cache, so causal attention over the whole step is one
        # paged call: it beats SDPA's CPU kernel on prefill as well (GQA without repeating K/V).
        return paged_decode_attention(q, k_cache, v_cache, meta.token_block_tables, meta.token_context_lens,
                                      meta.block_size, scale)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    nd = meta.num_decode
    if nd:
        out[:nd] = decode_attention(q[:nd], k_cache, v_cache, meta.decode_slots, meta.decode_padding, scale)
    for p in meta.prefills:
        qp = q[p.q_start : p.q_end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if p.context_slots is None:
            kp = k[p.q_start : p.q_end].transpose(0, 1).unsqueeze(0)
            vp = v[p.q_start : p.q_end].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            kp = k_cache.index_select(0, p.context_slots).transpose(0, 1).unsqueeze(0)
            vp = v_cache.index_select(0, p.context_slots).transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=gqa)
        out[p.q_start : p.q_end] = op.squeeze(0).transpose(0, 1)
    return out
