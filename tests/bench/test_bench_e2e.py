"""`splitserve bench` against the real `splitserve serve --model demo` (slow: loads the model)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEMO_AGGREGATED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_server(shared_servers):
    try:
        import splitserve.api.serve_cli  # noqa: F401
        from splitserve.models.registry import demo_model_path

        demo_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the splitserve server or the demo model is not available yet: {exc}")
    return shared_servers.get(*DEMO_AGGREGATED).base_url


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bench_against_real_server(real_server, tmp_path, endpoint):
    from splitserve.bench.cli import main
    from splitserve.bench.schema import load_results

    out = tmp_path / "r.json"
    rc = main(["--base-url", real_server, "--endpoint", endpoint, "--num-requests", "4", "--concurrency", "2",
               "--input-len", "48", "--output-len", "12", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000",
               "--quiet", "--output", str(out)])
    assert rc == 0
    (r,) = load_results(str(out))
    s = r.summary
    assert (s.completed, s.failed) == (4, 0), s.errors
    assert r.config.model == "SmolLM2-135M-Instruct"
    assert r.config.tokenizer.startswith("splitserve:")  # prompts tokenized with the model's tokenizer
    for rec in r.requests:
        assert rec.token_source == "usage" and rec.output_tokens == 12  # ignore_eos + max_tokens
        assert rec.input_tokens >= 48 and rec.ttft_ms > 0 and len(rec.itl_ms) >= 1
        assert rec.e2e_ms >= rec.ttft_ms
    assert s.goodput.fraction == 1.0
    assert s.ttft_ms.p50 > 0 and s.tpot_ms.mean > 0
    json.loads(out.read_text())


def test_agent_chain_against_real_server(real_server, tmp_path):
    from splitserve.bench.cli import main
    from splitserve.bench.schema import load_results

    out = tmp_path / "r.json"
    rc = main(["--base-url", real_server, "--workload", "agent", "--sessions", "2", "--steps", "3",
               "--tool-tokens", "16", "--answer-tokens", "6", "--quiet", "--output", str(out)])
    assert rc == 0
    (r,) = load_results(str(out))
    assert r.summary.completed_chains == 2 and r.summary.failed == 0
    steps = sorted((x for x in r.requests if x.chain_id == 0), key=lambda x: x.step)
    # each step's prompt holds the whole conversation so far: it grows by answer + tool tokens
    assert steps[0].input_tokens < steps[1].input_tokens < steps[2].input_tokens
    assert steps[2].input_tokens - steps[1].input_tokens >= 6 + 16
