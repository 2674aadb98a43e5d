"""Load weights from a Hugging Face directory (safetensors, sharded or not) or a GGUF file.

Both paths yield Hugging Face tensor names, so the model code knows one naming scheme.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterator

import numpy as np
import torch

from splitserve.models.config import ModelArchConfig
from splitserve.models.gguf_file import GGUFFile

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def load_arch_config(path: str) -> ModelArchConfig:
    if path.endswith(".gguf"):
        f = GGUFFile(path)
        return ModelArchConfig.from_gguf_metadata(f.metadata, f.tensors.keys())
    return ModelArchConfig.from_hf_dir(path)


def iter_weights(path: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor in `dtype` on CPU) for every weight of the model."""
    if path.endswith(".gguf"):
        yield from _iter_gguf(path, dtype)
    else:
        yield from _iter_safetensors(path, dtype)


def _iter_safetensors(path: str, dtype: torch.dtype):
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, name) for name in files]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(dtype)


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves for Llama q/k weights; undo it."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _iter_gguf(path: str, dtype: torch.dtype):
    f = GGUFFile(path)
    arch = f.metadata["general.architecture"]
    cfg = ModelArchConfig.from_gguf_metadata(f.metadata, f.tensors.keys())
    for gname, tensor in f.tensors.items():
        m = _BLK.fullmatch(gname)
        if m:
            suffix = _GGUF_LAYER_NAMES.get(m.group(2))
            name = f"model.layers.{m.group(1)}.{suffix}" if suffix else None
        else:
            name = _GGUF_GLOBAL_NAMES.get(gname)
        if name is None:
            continue  # e.g. rope_freqs: we compute the frequencies ourselves
        w = tensor.to_numpy()
        if arch == "llama":
            if m and m.group(2).startswith("attn_q."):
                w = _unpermute_rope(w, cfg.num_heads)
            elif m and m.group(2).startswith("attn_k."):
                w = _unpermute_rope(w, cfg.num_kv_heads)
        if not w.flags.writeable or not w.flags.c_contiguous:
            w = np.array(w)  # float32 tensors are read-only views of the mapped file
        yield name, torch.from_numpy(w).to(dtype)
