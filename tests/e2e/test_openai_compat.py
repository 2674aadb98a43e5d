"""OpenAI compatibility over HTTP with the official client: `models.retrieve`, and `echo` with
`logprobs` (prompt logprobs, as lm-evaluation-harness's log-likelihood tasks use them), checked
against transformers' log-softmax on a tiny random model that uses the demo's tokenizer."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.e2e.test_hostile_model_template import write_model_with_template
from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{{ '<|im_start|>assistant\n' }}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_with_template(str(tmp_path_factory.mktemp("models")), TEMPLATE)


@pytest.fixture(scope="module", params=["aggregated", "disaggregated"])
def server(model_dir, request):
    mode = ["--disaggregated"] if request.param == "disaggregated" else []
    with ServerProcess("--model", model_dir, "--max-model-len", "256", "--threads", "1", "--dtype", "float32",
                       "--served-model-name", "tiny", *mode) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(autouse=True)
def leak_check(server):
    yield
    server.wait_idle()


def test_models_retrieve(client):
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    body = err.value.response.json()["error"]
    assert body["code"] == "model_not_found" and "no-such-model" in body["message"]


PROMPT = "The quick brown fox jumps over the lazy dog, twice."


def test_echo_with_logprobs_matches_transformers(client, model_dir):
    from transformers import AutoModelForCausalLM

    from splitserve.models.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    ids = tok.encode(PROMPT)
    res = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, echo=True, logprobs=2,
                                    temperature=0, extra_body={"ignore_eos": True})
    lp = res.choices[0].logprobs
    n = len(ids)
    assert res.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == n + 3 and lp.tokens[:n] == [tok.token_text(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    for p in range(1, n):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=2e-3)
        top = torch.topk(ref[p - 1], 2)
        assert sorted(lp.top_logprobs[p].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=2e-3)
    assert all(v is not None for v in lp.token_logprobs[n:])  # the generated tokens follow
    # streaming with echo + logprobs is refused clearly, not answered without them
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1, stream=True)
