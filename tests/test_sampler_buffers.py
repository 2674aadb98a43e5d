"""The sampler's reused buffers against the plain allocating path: the same tokens, bit-identical
intermediates, on batches that mix greedy, seeded, filtered and constrained rows, step after step
(so a buffer left over from a larger or different batch never leaks into the next)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from splitserve.engine import sampler
from splitserve.engine.request import Request
from splitserve.engine.sampler import _step_uniform, sample
from splitserve.engine.sampling_params import SamplingParams


def _reference_process(logits, params):
    """The general path: every intermediate a new tensor (what the sampler did before its buffers)."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    logits = logits / temps.unsqueeze(1)
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        top_vals = torch.topk(logits, max(ks), dim=-1).values
        kth = top_vals.gather(1, torch.tensor([max(k, 1) - 1 for k in ks]).unsqueeze(1))
        kth[torch.tensor([k == 0 for k in ks])] = float("-inf")
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p.unsqueeze(1)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def reference_sample(logits, requests, token_bitmask=None):
    logits = logits.clone()
    if token_bitmask is not None:
        rows, bitmask = token_bitmask
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little", count=logits.shape[1])
        banned = torch.from_numpy(allowed).view(torch.bool).logical_not()
        for i, r in enumerate(rows):
            logits[r].masked_fill_(banned[i], float("-inf"))
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
    if random_rows:
        probs = torch.softmax(_reference_process(logits[random_rows],
                                                 [requests[i].sampling_params for i in random_rows]), dim=-1)
        cdf = torch.cumsum(probs, dim=-1)
        u = torch.tensor([_step_uniform(requests[i].seed, requests[i].num_output_tokens) for i in random_rows],
                         dtype=cdf.dtype).unsqueeze(1) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, u, right=True).squeeze(1)
        assert bool((picked < logits.shape[1]).all())  # the edge case has its own tests (test_sampler.py)
        tokens[random_rows] = picked
    return tokens.tolist()


def _random_params(rng: random.Random) -> SamplingParams:
    kind = rng.choice(["greedy", "plain", "plain", "top_k", "top_p", "hot"])
    if kind == "greedy":
        return SamplingParams(temperature=0.0)
    if kind == "top_k":
        return SamplingParams(temperature=0.7, top_k=rng.choice([1, 5, 50]))
    if kind == "top_p":
        return SamplingParams(temperature=1.0, top_p=rng.choice([0.5, 0.9]))
    return SamplingParams(temperature=1.7 if kind == "hot" else 1.0)


@pytest.mark.parametrize("vocab", [97, 49152])
def test_buffered_sampler_matches_the_allocating_path_step_by_step(vocab):
    rng = random.Random(vocab)
    g = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    for step in range(40):
        batch = rng.choice([1, 3, 8, 32, 5])  # sizes go up and down: buffers are sliced, not stale
        reqs = []
        for i in range(batch):
            r = Request(f"s{step}-{i}", [1, 2, 3], _random_params(rng), seed=rng.getrandbits(63))
            for t in range(rng.randrange(4)):
                r.append_token(t)
            reqs.append(r)
        if step % 5 == 0:  # every row samples at temperature 1: the no-gather path
            reqs = [Request(f"a{step}-{i}", [1], SamplingParams(temperature=1.0), seed=i) for i in range(batch)]
        logits = torch.randn(batch, vocab, generator=g) * 3
        mask = None
        if step % 2:
            rows = sorted(rng.sample(range(batch), rng.randint(1, batch)))
            bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), dtype=torch.int32, generator=g)
            mask = (rows, bitmask)
        expected = reference_sample(logits, reqs, mask)
        got, _ = sample(logits.clone(), reqs, mask)
        assert got == expected, f"step {step}"


def test_in_place_softmax_and_buffered_cumsum_are_bit_identical():
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 49152), (32, 49152), (7, 1000)]:
        x = torch.randn(*shape, generator=g) * 5
        x[:, ::7] = float("-inf")
        ref = torch.softmax(x, dim=-1)
        inplace = x.clone()
        torch.softmax(inplace, dim=-1, out=inplace)
        assert torch.equal(ref.view(torch.int32), inplace.view(torch.int32))
        cdf = torch.cumsum(ref, dim=-1, out=sampler._scratch.get("cdf", ref))
        assert torch.equal(torch.cumsum(ref, dim=-1).view(torch.int32), cdf.view(torch.int32))


def test_buffers_made_in_inference_mode_serve_outside_it():
    """The engine samples under torch.inference_mode; a buffer it made there must stay usable by a
    caller outside it (an inference tensor could not be written in place there)."""
    reqs = [Request(f"i{i}", [1], SamplingParams(temperature=1.0), seed=i) for i in range(3)]
    logits = torch.randn(3, 4099)
    bitmask = torch.full((3, (4099 + 31) // 32), -1, dtype=torch.int32)
    sampler._scratch.buffers.clear()
    with torch.inference_mode():
        inside, _ = sample(logits.clone(), reqs, ([0, 1, 2], bitmask))
    outside, _ = sample(logits.clone(), reqs, ([0, 1, 2], bitmask))
    assert inside == outside == reference_sample(logits, reqs)
