"""A model whose own chat template is hostile (a tiny random model with the demo's tokenizer):
rendering runs off the event loop and within bounds, so the server answers a clear 400 quickly,
its memory stays bounded and /health keeps answering while a slow render runs."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from tests.e2e.test_hostile_input import HealthProbe, assert_error, peak_rss_mb
from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

# One template, three behaviours, chosen by the first message.
HOSTILE_TEMPLATE = (
    "{% set text = messages[0]['content'] %}"
    "{% if text == 'bomb' %}{{ 'ab ' * 100000000 }}"
    "{% elif text == 'loops' %}{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    "{% elif text.startswith('slow') %}"
    "{% for i in range(100000) %}{% if text.count('zz') > 10 %}x{% endif %}{% endfor %}"
    "{% else %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_model_with_template(root: str, template: str) -> str:
    import torch
    import transformers

    from splitserve.models.registry import demo_model_path
    from splitserve.models.tokenizer import load_tokenizer

    out = os.path.join(root, "hostile-template")
    tok = load_tokenizer(demo_model_path())
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        f.write(tok.backend.to_str())
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": tok.bos_token, "eos_token": tok.eos_token}, f)
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(template)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_model_with_template(str(tmp_path_factory.mktemp("models")), HOSTILE_TEMPLATE)
    with ServerProcess("--model", model, "--max-model-len", "512", "--threads", "1") as s:
        yield s
    # the model folder goes with pytest's tmp_path retention


def chat(server, content: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=timeout,
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})


def test_ordinary_render_still_serves(server):
    resp = chat(server, "hello")
    assert resp.status_code == 200, resp.text
    server.wait_idle()


@pytest.mark.parametrize("content", ["bomb", "loops"])
def test_models_own_hostile_template_is_a_quick_400(server, content):
    before = peak_rss_mb(server.proc.pid)
    t0 = time.perf_counter()
    resp = chat(server, content)
    assert time.perf_counter() - t0 < 10
    assert_error(resp, 400, "could not apply the chat template")
    assert peak_rss_mb(server.proc.pid) < before + 100
    server.wait_idle()


def test_health_answers_during_a_slow_render(server):
    with HealthProbe(server) as probe:
        t0 = time.perf_counter()
        resp = chat(server, "slow " + "ab " * 12000)  # within the size bound: it renders
        render_s = time.perf_counter() - t0
    assert_error(resp, 400, "could not apply the chat template")
    assert render_s > 0.5  # long enough that the probe ran meanwhile
    assert probe.failures == 0 and len(probe.latencies) >= 3
    assert max(probe.latencies) < 1.0, max(probe.latencies)
    server.wait_idle()
