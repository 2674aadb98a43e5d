"""Extreme sampling parameters: a vanishing temperature is greedy, never NaN; a repetition penalty
small enough to overflow the logits is refused."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.engine.request import Request
from splitserve.engine.sampler import sample
from splitserve.engine.sampling_params import SamplingParams


def req(seed: int, **kw) -> Request:
    return Request("r", [1, 2, 3], SamplingParams(**kw), seed=seed)


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-8, 9e-6])
def test_vanishing_temperature_is_greedy(temperature):
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 5
    greedy, _ = sample(logits.clone(), [req(s, temperature=0.0) for s in range(4)])
    tiny, lps = sample(logits.clone(), [req(s, temperature=temperature, logprobs=2) for s in range(4)])
    assert tiny == greedy
    assert all(math.isfinite(lp.token_logprob) for lp in lps)


def test_tiny_temperature_above_the_threshold_still_samples_finite():
    logits = torch.tensor([[2.0, 1.0, 30.0, -4.0]])
    tokens, _ = sample(logits.clone(), [req(3, temperature=2e-5)])
    assert tokens == [2]


@pytest.mark.parametrize("penalty", [1e-300, 1e-3, 0.0, -1.0, float("nan")])
def test_repetition_penalty_that_would_overflow_is_refused(penalty):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=penalty)


def test_smallest_repetition_penalty_gives_finite_choices():
    logits = torch.tensor([[3.0e1, 1.0, 2.0, 25.0, -3.0]])
    r = Request("r", [0, 3], SamplingParams(temperature=1.0, repetition_penalty=0.01, logprobs=1), seed=1)
    tokens, lps = sample(logits.clone(), [r])
    assert tokens[0] in (0, 3)  # seen tokens are favoured (p < 1), and the draw is a real token
    assert math.isfinite(lps[0].token_logprob)
