"""Sampler semantics on hand-made logits: filters, penalties, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.engine.request import Request
from splitserve.engine.sampler import sample
from splitserve.engine.sampling_params import SamplingParams


def req(rid="r", seed=0, prompt=(1, 2, 3), output=(), **kw) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**kw), seed=seed)
    for t in output:
        r.append_token(t)
    return r


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])


def test_greedy_is_argmax():
    tokens, _ = sample(LOGITS.clone(), [req(temperature=0.0)])
    assert tokens == [5]


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=0.01), dict(min_p=1.0)])
def test_filters_that_leave_one_token_are_greedy(kw):
    for seed in range(20):
        tokens, _ = sample(LOGITS.clone(), [req(seed=seed, temperature=1.0, **kw)])
        assert tokens == [5]


def test_top_k_restricts_support():
    seen = {sample(LOGITS.clone(), [req(seed=s, temperature=5.0, top_k=2)])[0][0] for s in range(200)}
    assert seen == {0, 5}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS[0], -1)
    # Sorted: 5 (0.58), 0 (0.21), 1 (0.08)... top_p=0.7 keeps {5, 0}.
    assert probs[5] < 0.7 < probs[5] + probs[0]
    seen = {sample(LOGITS.clone(), [req(seed=s, top_p=0.7)])[0][0] for s in range(300)}
    assert seen == {0, 5}


def test_min_p_drops_unlikely_tokens():
    probs = torch.softmax(LOGITS[0], -1)
    threshold = 0.3 * probs.max()
    allowed = {i for i in range(6) if probs[i] >= threshold}
    seen = {sample(LOGITS.clone(), [req(seed=s, min_p=0.3)])[0][0] for s in range(300)}
    assert seen == allowed


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    draws = [sample(logits.clone(), [req(seed=s)])[0][0] for s in range(2000)]
    frac = sum(draws) / len(draws)
    assert abs(frac - 0.75) < 0.04


def test_inverse_cdf_edges_never_pick_a_zero_probability_token():
    from splitserve.engine.sampler import _inverse_cdf_draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    # u = 0 -> the first token with mass; u just under 1 (or rounding up to the total) -> the last.
    picked = _inverse_cdf_draw(probs, [0.0, 0.49999, 0.5, 1.0 - 2**-53]).tolist()
    assert picked == [1, 1, 3, 3]
    assert _inverse_cdf_draw(probs[:1], [1.0]).tolist() == [3]  # at the total: the last token with mass, never 5


def test_uniform_draws_are_uniform_and_unrelated_across_positions():
    from splitserve.engine.sampler import _step_uniform

    us = [_step_uniform(seed, i) for seed in range(50) for i in range(200)]
    assert all(0.0 <= u < 1.0 for u in us)
    assert abs(sum(us) / len(us) - 0.5) < 0.01
    deciles = [sum(1 for u in us if k / 10 <= u < (k + 1) / 10) / len(us) for k in range(10)]
    assert max(abs(d - 0.1) for d in deciles) < 0.01
    pairs = list(zip(us[::2], us[1::2]))  # consecutive positions of one seed
    corr = sum((a - 0.5) * (b - 0.5) for a, b in pairs) / len(pairs) / (1 / 12)
    assert abs(corr) < 0.05


def test_seeded_draws_do_not_depend_on_batch_or_position():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    reqs = [req(f"r{i}", seed=100 + i, temperature=0.9) for i in range(4)]
    together, _ = sample(logits.clone(), reqs)
    alone = [sample(logits[i : i + 1].clone(), [reqs[i]])[0][0] for i in range(4)]
    assert together == alone
    reversed_order, _ = sample(logits.flip(0).clone(), reqs[::-1])
    assert reversed_order[::-1] == together


def test_different_output_positions_draw_fresh_randomness():
    logits = torch.zeros(1, 50)
    draws = set()
    for n_out in range(20):
        draws.add(sample(logits.clone(), [req(seed=7, output=[9] * n_out)])[0][0])
    assert len(draws) > 5


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.2, 0.5]])
    r = req(prompt=(0, 1), temperature=0.0, repetition_penalty=2.0)
    # token 0: 2.0 -> 1.0, token 1: -2.0 -> -4.0; token 2 (1.2) now wins.
    assert sample(logits.clone(), [r])[0] == [2]


def test_frequency_and_presence_penalties():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    r = req(output=(0, 0), temperature=0.0, frequency_penalty=0.2, presence_penalty=0.2)
    # token 0: 3.0 - 2*0.2 - 0.2 = 2.4 < 2.5
    assert sample(logits.clone(), [r])[0] == [1]
    r = req(output=(0,), temperature=0.0, frequency_penalty=0.2)
    assert sample(logits.clone(), [r])[0] == [0]


def test_logprobs_are_raw_model_logprobs():
    logits = torch.randn(2, 30)
    reqs = [req("a", temperature=0.0, logprobs=3), req("b", temperature=0.7, seed=3, logprobs=0)]
    tokens, lps = sample(logits.clone(), reqs)
    ref = torch.log_softmax(logits, -1)
    assert lps[0].token_logprob == pytest.approx(ref[0, tokens[0]].item(), abs=1e-6)
    assert [t for t, _ in lps[0].top] == ref[0].topk(3).indices.tolist()
    assert lps[1].top == [] and lps[1].token_logprob == pytest.approx(ref[1, tokens[1]].item(), abs=1e-6)


def test_invalid_params_are_rejected():
    for kw in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2.0),
               dict(max_tokens=0), dict(logprobs=21), dict(repetition_penalty=0.0), dict(stop=("",)),
               dict(presence_penalty=3.0), dict(min_tokens=5, max_tokens=2)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)
