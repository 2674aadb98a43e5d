"""Hardware and model catalogs: ids, sources, parameter counts."""

from __future__ import annotations

import json

import pytest

from splitserve.sim.hardware import HARDWARE, LINKS, get_hardware, get_link, parse_hardware_arg
from splitserve.sim.models import MODELS, from_hf_config, get_model

ISSUE_IDS = ("cs3", "groq-lpu", "trn2", "trn3", "h100", "h200", "b200", "b300", "mi300x", "mi355x",
             "tpu-v6e", "tpu-ironwood", "local-cpu")


def test_every_issue_id_exists_with_sources_power_and_price():
    for name in ISSUE_IDS:
        h = get_hardware(name)
        assert h.sources, name
        assert h.power_w > 0 and h.price_per_hour > 0 and h.memory_bytes > 0 and h.mem_bandwidth > 0
        assert h.scale_up in LINKS and h.scale_out in LINKS
    for link in LINKS.values():
        assert link.source and link.bandwidth > 0


def test_published_headline_numbers():
    cs3 = get_hardware("cs3")
    assert cs3.memory_bytes == 44e9 and cs3.mem_bandwidth == 21e15 and cs3.flops["bf16"] == 125e15
    assert cs3.power_w == 23_000
    groq = get_hardware("groq")
    assert groq.memory_bytes == 230e6 and groq.mem_bandwidth == 80e12 and groq.flops["bf16"] == 188e12
    trn2, trn3 = get_hardware("trn2"), get_hardware("trn3")
    assert trn2.memory_bytes == 96 * 2**30 and trn2.mem_bandwidth == 2.9e12 and trn2.flops["bf16"] == 667e12
    assert trn3.memory_bytes == 144 * 2**30 and trn3.flops["fp8"] == 2520e12
    assert get_link("efa-instance").bandwidth * 8 == pytest.approx(3200e9)
    assert get_link("cs3-io").bandwidth * 8 == pytest.approx(1200e9)


def test_hardware_args_and_links():
    hw, n = parse_hardware_arg("H100:8")
    assert hw.name == "h100" and n == 8
    assert parse_hardware_arg("cerebras")[1] is None
    with pytest.raises(ValueError):
        parse_hardware_arg("h100:0")
    with pytest.raises(ValueError):
        get_hardware("tpu-v1")
    assert get_link("25").bandwidth == 25e9 and get_link("50GBps").bandwidth == 50e9
    with pytest.raises(ValueError):
        get_link("carrier-pigeon")


@pytest.mark.parametrize("name,total,active", [
    ("llama-3.1-8b", 8.03, 8.03), ("llama-3.1-70b", 70.6, 70.6), ("llama-3.1-405b", 405.9, 405.9),
    ("qwen3-32b", 32.8, 32.8), ("qwen3-235b-a22b", 235.1, 22.2), ("deepseek-v3", 671.0, 37.5),
    ("gpt-oss-120b", 116.8, 5.7), ("smollm2-135m", 0.135, 0.135),
])
def test_parameter_counts_match_the_published_sizes(name, total, active):
    m = get_model(name)
    assert m.total_params / 1e9 == pytest.approx(total, rel=0.01)
    assert m.active_params / 1e9 == pytest.approx(active, rel=0.02)


def test_kv_sizes():
    assert get_model("llama-3.1-8b").kv_bytes_per_token("bf16") == 2 * 32 * 8 * 128 * 2  # 128 KiB
    assert get_model("llama-3.1-70b").kv_bytes_per_token("fp8") == 2 * 80 * 8 * 128
    assert get_model("deepseek-v3").kv_bytes_per_token("bf16") == 61 * (512 + 64) * 2  # MLA latent
    assert get_model("demo").name == "smollm2-135m"


def test_any_hf_config(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
           "vocab_size": 128256, "max_position_embeddings": 131072}
    path = tmp_path / "my-model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    m = get_model(str(path))
    assert m.name == "my-model" and m.total_params == MODELS["llama-3.1-8b"].total_params
    assert get_model(str(path.parent)).num_layers == 32
    moe = from_hf_config({**cfg, "num_experts": 64, "num_experts_per_tok": 4, "moe_intermediate_size": 1024})
    assert moe.is_moe and moe.active_params < moe.total_params
    with pytest.raises(ValueError):
        from_hf_config({"hidden_size": 8})
    with pytest.raises(ValueError):
        get_model("no-such-model")


def test_catalog_cli_lists(capsys):
    from splitserve.cli import main

    assert main(["hardware"]) == 0
    out = capsys.readouterr().out
    for name in ISSUE_IDS:
        assert f"| {name} |" in out
    assert main(["hardware", "cs3"]) == 0
    assert "source:" in capsys.readouterr().out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "| gpt-oss-120b |" in out and "| deepseek-v3 |" in out
    assert main(["hardware", "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert set(HARDWARE) >= set(ISSUE_IDS)
