"""Workload generation: what to send and when. Pure: no I/O, no clock, deterministic under a seed.

Every workload is an iterator of `RequestSpec`s in issue order. A spec carries either an arrival
offset (`arrival_s`, seconds after the run starts: open-loop load at a rate) or `arrival_s=None`
(closed loop: as soon as a concurrency slot frees up; for steps > 0 of an agent chain: right
after the previous step of the same chain finished). The steps of one chain are contiguous.

Prompts are slices of real text, tokenized with the target's tokenizer when one is available
(`TextSource`); without a `TextSource` the specs carry lengths only, which is all the simulator
needs. Lengths come from `LengthDist`s (fixed, uniform, lognormal), arrivals from `Arrival`
(Poisson, gamma with a burstiness factor, constant rate).

The simulator (splitserve.sim) imports this module: keep it free of network and file access.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# The inputs, trace parsing and agent tools live in their own modules; they are re-exported
# here, where the runner, the simulator and the CLI look for them.
from splitserve.bench.agent_tools import AGENT_TOOLS, tool_round_trip
from splitserve.bench.traces import MAX_MESSAGES, MAX_TEXT_CHARS, TraceRow, parse_trace_lines, parse_trace_row
from splitserve.bench.workload_inputs import (
    MAX_LEN,
    MAX_REQUESTS,
    Arrival,
    LengthDist,
    TextSource,
    Tokenizer,
    parse_length,
)

__all__ = [
    "AGENT_TOOLS", "MAX_LEN", "MAX_MESSAGES", "MAX_REQUESTS", "MAX_TEXT_CHARS", "PRESETS", "Arrival",
    "LengthDist", "Preset", "RequestSpec", "TextSource", "Tokenizer", "TraceRow", "agent_chains",
    "iter_units", "parse_length", "parse_trace_lines", "parse_trace_row", "preset", "shared_prefix",
    "synthetic", "tool_round_trip", "trace_replay",
]


@dataclass(frozen=True)
class RequestSpec:
    request_id: int
    input_len: int  # expected prompt tokens (chain steps: the whole conversation so far)
    output_len: int  # max_tokens (with ignore_eos: exactly this many)
    arrival_s: float | None = None  # offset from the run start; None = closed loop / after prev step
    prompt: str | None = None  # user text (for chain steps > 0: the new tool-result chunk)
    prompt_token_ids: tuple[int, ...] | None = None
    system: str | None = None  # system prompt (shared-prefix and agent workloads)
    system_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None  # explicit chat messages (trace replay)
    chain_id: int | None = None
    step: int = 0
    num_steps: int = 1
    prefix_group: int | None = None  # requests sharing a system prompt share this id
    shared_prefix_len: int = 0  # tokens of that shared prefix
    tools: tuple[dict[str, Any], ...] | None = None  # agent chains in tool-calling mode: the tools offered
    tool_choice: str | None = None  # "required" (a call is forced) or "none" (the chain's final answer)


# --------------------------------------------------------------------------------------------
# Workloads


def _rng(seed: int, stream: str) -> random.Random:
    """Independent, reproducible random streams: changing the rate does not change the lengths."""
    return random.Random(f"splitserve-bench:{seed}:{stream}")


def _arrivals(arrival: Arrival | None, seed: int) -> Iterator[float | None]:
    if arrival is None:
        while True:
            yield None
    else:
        yield from arrival.times(_rng(seed, "arrivals"))


def _bounded(
    specs: Iterator[RequestSpec], num: int | None, duration_s: float | None
) -> Iterator[RequestSpec]:
    """Stop after `num` units (requests or chains) or once arrivals pass `duration_s`."""
    limit = MAX_REQUESTS if num is None else min(num, MAX_REQUESTS)
    units = 0
    for spec in specs:
        if spec.step == 0:
            if units >= limit:
                return
            if duration_s is not None and spec.arrival_s is not None and spec.arrival_s >= duration_s:
                return
            units += 1
        yield spec


def _check_count(num_requests: int | None, duration_s: float | None) -> None:
    if num_requests is None and duration_s is None:
        raise ValueError("give num_requests or duration_s")
    if num_requests is not None and num_requests < 0:
        raise ValueError("num_requests must be >= 0")


def synthetic(
    *,
    input_len: LengthDist | int = 128,
    output_len: LengthDist | int = 128,
    num_requests: int | None = None,
    duration_s: float | None = None,
    arrival: Arrival | None = None,
    seed: int = 0,
    text: TextSource | None = None,
) -> Iterator[RequestSpec]:
    """Independent requests with lengths drawn from the given distributions."""
    _check_count(num_requests, duration_s)
    in_d, out_d = _dist(input_len), _dist(output_len)

    def gen() -> Iterator[RequestSpec]:
        lens, prompts = _rng(seed, "lengths"), _rng(seed, "prompts")
        for i, t in enumerate(_arrivals(arrival, seed)):
            n_in, n_out = in_d.sample(lens), out_d.sample(lens)
            ids, prompt = text.sample(n_in, prompts) if text else (None, None)
            yield RequestSpec(i, n_in, n_out, t, prompt=prompt, prompt_token_ids=ids)

    return _bounded(gen(), num_requests, duration_s)


def shared_prefix(
    *,
    prefix_len: int = 1024,
    input_len: LengthDist | int = 128,
    output_len: LengthDist | int = 128,
    num_prefixes: int = 1,
    num_requests: int | None = None,
    duration_s: float | None = None,
    arrival: Arrival | None = None,
    seed: int = 0,
    text: TextSource | None = None,
) -> Iterator[RequestSpec]:
    """One (or a few) long system prompts shared by many users, each with a short own question.

    Exercises prefix caching: request i uses system prompt i % num_prefixes. `input_len` is
    the user part; the expected prompt is prefix_len + input_len tokens.
    """
    _check_count(num_requests, duration_s)
    if not 1 <= num_prefixes <= 100_000 or not 0 <= prefix_len <= MAX_LEN:
        raise ValueError("bad shared-prefix parameters")
    in_d, out_d = _dist(input_len), _dist(output_len)

    def gen() -> Iterator[RequestSpec]:
        lens, prompts = _rng(seed, "lengths"), _rng(seed, "prompts")
        prefix_rng = _rng(seed, "prefixes")
        prefixes = [text.sample(prefix_len, prefix_rng) if text else (None, None) for _ in range(num_prefixes)]
        for i, t in enumerate(_arrivals(arrival, seed)):
            g = i % num_prefixes
            n_in, n_out = in_d.sample(lens), out_d.sample(lens)
            ids, prompt = text.sample(n_in, prompts) if text else (None, None)
            sys_ids, sys_text = prefixes[g]
            yield RequestSpec(
                i, prefix_len + n_in, n_out, t, prompt=prompt, prompt_token_ids=ids,
                system=sys_text, system_token_ids=sys_ids, prefix_group=g, shared_prefix_len=prefix_len,
            )

    return _bounded(gen(), num_requests, duration_s)


def agent_chains(
    *,
    num_chains: int | None = None,
    duration_s: float | None = None,
    steps: int = 10,
    tool_tokens: int = 256,
    answer_tokens: int = 128,
    input_len: int | None = None,
    system_len: int = 0,
    arrival: Arrival | None = None,
    seed: int = 0,
    text: TextSource | None = None,
    tool_calling: bool = False,
) -> Iterator[RequestSpec]:
    """Agent sessions: chains of `steps` sequential requests.

    Step 0 sends [system (system_len tokens, shared by all chains)] + a task of `input_len`
    tokens (default: tool_tokens). Step k > 0 sends the conversation so far - every earlier
    prompt and the model's actual answers - plus a new tool-result chunk of `tool_tokens`.
    Each step asks for `answer_tokens`, and its answer feeds the next step. Expected prompt of
    step k: system_len + input_len + k * (answer_tokens + tool_tokens).
    Step 0 of each chain carries the chain's arrival (None = closed loop: --concurrency chains at
    a time); later steps have arrival_s=None, meaning "right after the previous step".

    `tool_calling`: every step offers AGENT_TOOLS; steps before the last force a call
    (tool_choice "required"), the runner sends the model's call back as an assistant message
    and the next step's chunk as that call's `tool` result; the last step answers in text
    (tool_choice "none"). `answer_tokens` is then a cap: a call ends when its JSON does.
    """
    _check_count(num_chains, duration_s)
    if not 1 <= steps <= 10_000 or tool_tokens < 1 or answer_tokens < 1 or system_len < 0:
        raise ValueError("bad agent-chain parameters")
    first = tool_tokens if input_len is None else int(input_len)

    def gen() -> Iterator[RequestSpec]:
        prompts = _rng(seed, "prompts")
        sys_ids, sys_text = text.sample(system_len, _rng(seed, "prefixes")) if text and system_len else (None, None)
        rid = 0
        for c, t in enumerate(_arrivals(arrival, seed)):
            for k in range(steps):
                n_new = first if k == 0 else tool_tokens
                ids, prompt = text.sample(n_new, prompts) if text else (None, None)
                yield RequestSpec(
                    rid,
                    system_len + first + k * (answer_tokens + tool_tokens),
                    answer_tokens,
                    t if k == 0 else None,
                    prompt=prompt,
                    prompt_token_ids=ids,
                    system=sys_text if system_len else None,
                    system_token_ids=sys_ids,
                    chain_id=c,
                    step=k,
                    num_steps=steps,
                    prefix_group=0 if system_len else None,
                    shared_prefix_len=system_len,
                    tools=AGENT_TOOLS if tool_calling else None,
                    tool_choice=("required" if k < steps - 1 else "none") if tool_calling else None,
                )
                rid += 1

    return _bounded(gen(), num_chains, duration_s)


# --------------------------------------------------------------------------------------------
# Presets that mirror published production traces


@dataclass(frozen=True)
class Preset:
    name: str
    input_len: LengthDist
    output_len: LengthDist
    rate: float  # the trace's mean request rate, used when --rate is not given
    source: str
    notes: str = ""


# Azure LLM inference traces (CC-BY), https://github.com/Azure/AzurePublicDataset
#  2023: AzureLLMInferenceDataset2023.md, files data/AzureLLMInferenceTrace_{code,conv}.csv;
#        paper: Patel et al., "Splitwise: Efficient generative LLM inference using phase
#        splitting", ISCA 2024, section III-A: coding median prompt 1500 tokens and median
#        output 13 tokens; conversation median prompt 1020, median output 129 (bimodal).
#  2024: AzureLLMInferenceDataset2024.md (one week, May 2024); paper: Stojkovic et al.,
#        "DynamoLLM: Designing LLM Inference Clusters for Performance and Energy Efficiency",
#        HPCA 2025.
# Statistics computed from the released CSVs (median / mean / p99; request rate):
#  code 2023:  context 1469 / 2048 / 7436,  generated 13 / 28 / 249,  8,819 req in 57 min (2.57/s)
#  conv 2023:  context 1020 / 1155 / 4142 (max 14050), generated 129 / 211 / 601, 5.53 req/s
#  code 2024:  context 1930 / 2511 / 7685 (max 7743),  generated 8 / 23 / 271
#  conv 2024:  context  928 / 1632 / 6683 (max 7999),  generated 41 / 106 / 694
# Each length is modelled as a lognormal with the trace's median and mean
# (sigma = sqrt(2 ln(mean/median))), clipped to [1, max]: the clip keeps the p99 near the
# trace's (context is capped near 8K tokens by the models' context window). The 2024 traces'
# mean rates vary 3-33x over the day, so their presets use the 2023 rates as defaults.
PRESETS: dict[str, Preset] = {
    "azure-code": Preset(
        "azure-code",
        LengthDist.lognormal_from_mean(1469, 2048, 1, 7437),
        LengthDist.lognormal_from_mean(13, 28, 1, 1024),
        2.57,
        "Azure LLM inference trace 2023, coding (Splitwise, ISCA 2024)",
        "long prompts, very short outputs: prefill-dominated",
    ),
    "azure-conv": Preset(
        "azure-conv",
        LengthDist.lognormal_from_mean(1020, 1155, 1, 14050),
        LengthDist.lognormal_from_mean(129, 211, 1, 1024),
        5.53,
        "Azure LLM inference trace 2023, conversation (Splitwise, ISCA 2024)",
        "medium prompts, outputs of ~100-600 tokens: decode-heavy",
    ),
    "azure-code-2024": Preset(
        "azure-code-2024",
        LengthDist.lognormal_from_mean(1930, 2511, 1, 7743),
        LengthDist.lognormal_from_mean(8, 23, 1, 1024),
        2.57,
        "Azure LLM inference trace 2024, coding (DynamoLLM, HPCA 2025)",
    ),
    "azure-conv-2024": Preset(
        "azure-conv-2024",
        LengthDist.lognormal_from_mean(928, 1632, 1, 7999),
        LengthDist.lognormal_from_mean(41, 106, 1, 2048),
        5.53,
        "Azure LLM inference trace 2024, conversation (DynamoLLM, HPCA 2025)",
    ),
}


def preset(
    name: str,
    *,
    num_requests: int | None = None,
    duration_s: float | None = None,
    arrival: Arrival | None = None,
    seed: int = 0,
    text: TextSource | None = None,
) -> Iterator[RequestSpec]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[name]
    return synthetic(
        input_len=p.input_len, output_len=p.output_len, num_requests=num_requests,
        duration_s=duration_s, arrival=arrival, seed=seed, text=text,
    )


# --------------------------------------------------------------------------------------------
# Trace replay


def trace_replay(
    rows: Sequence[TraceRow],
    *,
    time_scale: float = 1.0,
    num_requests: int | None = None,
    duration_s: float | None = None,
    closed_loop: bool = False,
    seed: int = 0,
    text: TextSource | None = None,
) -> Iterator[RequestSpec]:
    """Replay rows in timestamp order at their recorded offsets divided by `time_scale`
    (2.0 = twice as fast). Rows with messages or a prompt send them as they are; rows with
    only an input length get a real-text prompt of that length (or lengths only without text).
    closed_loop=True ignores timestamps (use with a concurrency limit)."""
    if time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    ordered = sorted(rows, key=lambda r: r.timestamp)
    t0 = ordered[0].timestamp if ordered else 0.0

    def gen() -> Iterator[RequestSpec]:
        prompts = _rng(seed, "prompts")
        for i, row in enumerate(ordered):
            t = None if closed_loop else (row.timestamp - t0) / time_scale
            ids = prompt = None
            n_in = row.input_len
            if row.messages is None and row.prompt is None and text is not None:
                ids, prompt = text.sample(n_in or 1, prompts)
            elif row.prompt is not None:
                prompt = row.prompt
            if n_in is None:  # estimate from the text: ~4 characters per token
                chars = sum(len(m["content"]) for m in row.messages or ()) + len(row.prompt or "")
                n_in = max(1, chars // 4)
            yield RequestSpec(i, n_in, row.output_len, t, prompt=prompt, prompt_token_ids=ids, messages=row.messages)

    limit = len(ordered) if num_requests is None else min(num_requests, len(ordered))
    return _bounded(gen(), limit, duration_s)


# --------------------------------------------------------------------------------------------
# Helpers


def _dist(x: LengthDist | int | str) -> LengthDist:
    return x if isinstance(x, LengthDist) else parse_length(x)


def iter_units(specs: Iterable[RequestSpec]) -> Iterator[list[RequestSpec]]:
    """Group specs into units: a single request, or all steps of one chain (contiguous)."""
    unit: list[RequestSpec] = []
    for spec in specs:
        if unit and (spec.step == 0 or spec.chain_id != unit[0].chain_id):
            yield unit
            unit = []
        unit.append(spec)
    if unit:
        yield unit
