"""Weight loading: the GGUF dequantization cache gives the same tensors as the GGUF itself."""

from __future__ import annotations

import os

import torch

from splitserve.models import loader
from splitserve.models.registry import demo_model_path


def test_gguf_weight_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path))
    path = demo_model_path()
    first = dict(loader.iter_weights(path, torch.bfloat16))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".safetensors")
    second = dict(loader.iter_weights(path, torch.bfloat16))
    assert first.keys() == second.keys()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(first[name], second[name])
    # A different dtype is a different cache entry; a corrupt entry is rebuilt, not trusted.
    loader.iter_weights(path, torch.float32)
    corrupt = tmp_path / files[0]
    corrupt.write_bytes(b"garbage")
    third = dict(loader.iter_weights(path, torch.bfloat16))
    assert torch.equal(third["model.layers.0.self_attn.q_proj.weight"], first["model.layers.0.self_attn.q_proj.weight"])


def test_cache_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv(loader.CACHE_ENV, "off")
    assert loader._cache_file(demo_model_path(), torch.bfloat16) is None
