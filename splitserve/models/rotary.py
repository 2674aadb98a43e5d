"""Rotary position tables (rotate-half layout, as in Hugging Face Llama), with llama3 and linear scaling.

Applying them is an element-wise op in `splitserve.kernels.fused` (`apply_rotary`)."""

from __future__ import annotations

import math

import torch

from splitserve.models.config import ModelArchConfig


def inverse_frequencies(cfg: ModelArchConfig, rotary_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    s = cfg.rope_scaling
    if s.rope_type == "linear":
        inv_freq = inv_freq / s.factor
    elif s.rope_type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding:
    def __init__(self, cfg: ModelArchConfig, max_positions: int, dtype: torch.dtype, device) -> None:
        inv_freq = inverse_frequencies(cfg, cfg.head_dim)
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # Computed in float32 and cast, as transformers does, so bf16 results agree with it.
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)
        self.half = cfg.head_dim // 2

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for a step's positions, [T, D]: gathered once per step, used by every layer."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)
