"""Load weights from a Hugging Face directory (safetensors, sharded or not) or a GGUF file.

Both paths yield Hugging Face tensor names, so the model code knows one naming scheme.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
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
log = logging.getLogger("splitserve.loader")


def load_arch_config(path: str) -> ModelArchConfig:
    if path.endswith(".gguf"):
        f = GGUFFile(path)
        return ModelArchConfig.from_gguf_metadata(f.metadata, f.tensors.keys())
    return ModelArchConfig.from_hf_dir(path)


CACHE_ENV = "SPLITSERVE_WEIGHT_CACHE"  # a directory, or "off"


def _cache_file(path: str, dtype: torch.dtype) -> str | None:
    """Where a dequantized copy of a GGUF file lives: keyed by the file's identity and the dtype."""
    root = os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "splitserve", "weights"))
    if root == "off":
        return None
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{dtype}|v1".encode()).hexdigest()[:24]
    return os.path.join(root, f"{os.path.basename(path)}.{str(dtype).removeprefix('torch.')}.{key}.safetensors")


def iter_weights(path: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor in `dtype` on CPU) for every weight of the model.

    GGUF files are dequantized once and kept as safetensors in ~/.cache/splitserve/weights
    (`SPLITSERVE_WEIGHT_CACHE=off` disables it): later starts map that file instead of
    dequantizing again, which is most of a cold start on small models.
    """
    if not path.endswith(".gguf"):
        yield from _iter_safetensors(path, dtype)
        return
    cache = _cache_file(path, dtype)
    if cache is not None and os.path.isfile(cache):
        try:
            yield from _iter_safetensors_file(cache, dtype)
            return
        except Exception as exc:  # a truncated or foreign file: rebuild it
            log.warning("ignoring weight cache %s: %s", cache, exc)
    tensors = dict(_iter_gguf(path, dtype))
    if cache is not None:
        _write_cache(cache, tensors)
    yield from tensors.items()


def _write_cache(cache: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, cache)  # atomic: a concurrent reader sees the whole file or none
    except OSError as exc:
        log.warning("could not write the weight cache %s: %s", cache, exc)


def _iter_safetensors_file(file: str, dtype: torch.dtype):
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name).to(dtype)


def _iter_safetensors(path: str, dtype: torch.dtype):
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
        yield from _iter_safetensors_file(file, dtype)


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
