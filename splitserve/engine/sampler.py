"""Turn a step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Randomness is stateless: row r draws one uniform number determined by (request seed, output
index) alone and picks its token by inverse CDF, so a request's tokens do not depend on what else
is in the batch, survive preemption, and come out the same when another worker (a decode worker
after a prefill worker) continues the request. One number per row, not one per vocabulary entry:
a seeded torch.Generator filling 49k exponentials cost ~1.3 ms per row per step on a CPU.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from splitserve.engine.request import Request

_MASK = float("-inf")


class _Scratch(threading.local):
    """Per-thread buffers for the sampler's batch-sized intermediates, reused across steps (they
    only grow: the largest batch x vocabulary seen, a few per engine thread).

    A fresh 32 x 49k float tensor is 6 MB that glibc maps and the kernel zero-fills page by page
    on every step; on a loaded 2-core VM the sampler's four such allocations cost several ms a
    step, more than the arithmetic. Written with out= the same kernels give the same values."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A `shape` (default: like's) tensor of like's dtype and device, contents undefined."""
        shape = tuple(like.shape) if shape is None else shape
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != like.dtype or buf.device != like.device or buf.numel() < n:
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                buf = self.buffers[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


_scratch = _Scratch()


@dataclass(slots=True)
class TokenLogprobs:
    token_logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


_M64 = 2**64 - 1


def _step_uniform(seed: int, index: int) -> float:
    """A uniform draw in [0, 1) fixed by (seed, output index): splitmix64 over the pair, 53 bits."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return (z >> 11) * (1.0 / (1 << 53))


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    for row, req in enumerate(requests):
        p = req.sampling_params
        if not p.needs_penalties:
            continue
        vocab = logits.shape[1]
        out_ids = torch.tensor(req.output_token_ids, dtype=torch.long, device=logits.device)
        out_ids = out_ids[out_ids < vocab]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(req.token_ids, dtype=torch.long, device=logits.device)
            seen = torch.unique(seen[seen < vocab])
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out_ids.numel() and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(out_ids, minlength=vocab).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Grammar constraints for the whole batch in one call: bit t of bitmask[i] set means token t
    is allowed in row rows[i]; every other token's logit becomes -inf (in place).

    Each mask byte (8 tokens) picks a row of 8 bounds from a 256-entry table: +inf where the bit
    is set, -inf where not; an elementwise minimum with those bounds leaves an allowed logit as it
    is (signed zeros included) and makes a banned one -inf. One gather and one minimum over the
    batch cost ~6x less than unpacking bits into a bool mask and masked_fill (32 x 49k on a CPU:
    0.5 ms against 3.2 ms). A NaN logit stays NaN (its row is meaningless either way)."""
    num_rows, vocab = logits.shape
    nbytes = -(-vocab // 8)
    table = _bound_table(logits.dtype, logits.device)
    # int32 words -> little-endian bytes: byte k holds tokens 8k..8k+7, bit j token 8k+j
    mask_bytes = bitmask.view(torch.uint8)[:, :nbytes].to(logits.device)
    flat = _scratch.get("bounds", logits, (len(rows) * nbytes, 8))
    bounds = torch.index_select(table, 0, mask_bytes.reshape(-1).to(torch.int32), out=flat)
    bounds = bounds.view(len(rows), nbytes * 8)[:, :vocab]
    if len(rows) == num_rows:
        torch.minimum(logits, bounds, out=logits)
    else:
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits.index_copy_(0, index, torch.minimum(logits.index_select(0, index), bounds))


_BOUND_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _bound_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 8]: entry (b, j) is +inf when bit j of byte b is set (token allowed), else -inf."""
    table = _BOUND_TABLES.get((dtype, device))
    if table is None:
        with torch.inference_mode(False):
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
            table = torch.where(bits.bool(), float("inf"), _MASK).to(dtype=dtype, device=device)
        _BOUND_TABLES[(dtype, device)] = table
    return table


def sample(logits: torch.Tensor, requests: list[Request],
           token_bitmask: tuple[list[int], torch.Tensor] | None = None) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [R, V] float32, one row per request that samples this step. `token_bitmask`: the
    rows under a grammar and their allowed tokens (see apply_token_bitmask); logprobs stay those
    of the unconstrained distribution, as in vLLM."""
    want_logprobs = [r.sampling_params.logprobs is not None for r in requests]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    if any(r.sampling_params.needs_penalties for r in requests):
        logits = logits.clone()
        apply_penalties(logits, requests)
    if token_bitmask is not None:
        apply_token_bitmask(logits, *token_bitmask)

    random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
    # every row samples: no argmax (it would be thrown away) and no row gather (the temperature
    # writes the sampler's own copy)
    every = bool(random_rows) and len(random_rows) == len(requests)
    if random_rows:
        sub = _process_for_sampling(logits if every else logits[random_rows],
                                    [requests[i].sampling_params for i in random_rows])
        probs = sub.float()  # the sampler's own tensor (scratch or new): softmax in place
        torch.softmax(probs, dim=-1, out=probs)
        drawn = _inverse_cdf_draw(probs, [
            _step_uniform(requests[i].seed, requests[i].num_output_tokens) for i in random_rows])
    if every:
        tokens = drawn
    else:
        tokens = torch.argmax(logits, dim=-1)
        if random_rows:
            tokens[random_rows] = drawn

    token_list = tokens.tolist()
    logprob_list: list[TokenLogprobs | None] = [None] * len(requests)
    if raw_logprobs is not None:
        for i, req in enumerate(requests):
            k = req.sampling_params.logprobs
            if k is None:
                continue
            row = raw_logprobs[i]
            top: list[tuple[int, float]] = []
            if k:
                vals, ids = torch.topk(row, k)
                top = list(zip(ids.tolist(), vals.tolist()))
            logprob_list[i] = TokenLogprobs(float(row[token_list[i]]), top)
    return token_list, logprob_list


def target_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
    """Row r's log-softmax at `targets[r]`, with the row's `k` most likely tokens (prompt logprobs)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    if not k:
        return [TokenLogprobs(lp, []) for lp in chosen]
    vals, ids = torch.topk(logprobs, k, dim=-1)
    return [TokenLogprobs(lp, list(zip(i, v))) for lp, i, v in zip(chosen, ids.tolist(), vals.tolist())]


def _inverse_cdf_draw(probs: torch.Tensor, uniforms: list[float]) -> torch.Tensor:
    """Row r's token: the first index whose cumulative probability exceeds u_r x the row's total
    (a token of probability 0 is never picked: its cumulative sum does not rise)."""
    cdf = torch.cumsum(probs, dim=-1, out=_scratch.get("cdf", probs))
    u = torch.tensor(uniforms, dtype=cdf.dtype, device=cdf.device).unsqueeze(1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u x total can round up to the total itself (u within 2^-24 of 1): take the row's last
    # token with mass, which is where the draw belongs.
    vocab = probs.shape[1]
    over = picked >= vocab
    if bool(over.any()):
        last = vocab - 1 - torch.argmax((probs.flip(1) > 0).to(torch.uint8), dim=-1)
        picked = torch.where(over, last, picked)
    return picked


def _process_for_sampling(logits: torch.Tensor, params) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering, vectorised over rows."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev)
    logits = torch.div(logits, temps.unsqueeze(1), out=_scratch.get("scaled", logits))
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        kmax = max(ks)
        top_vals = torch.topk(logits, kmax, dim=-1).values
        k_idx = torch.tensor([max(k, 1) - 1 for k in ks], device=dev)
        kth = top_vals.gather(1, k_idx.unsqueeze(1))
        kth[torch.tensor([k == 0 for k in ks], device=dev)] = _MASK
        logits = logits.masked_fill(logits < kth, _MASK)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, _MASK)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=dev)
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, _MASK)
    return logits
