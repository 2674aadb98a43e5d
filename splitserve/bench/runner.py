"""Drive a workload against an endpoint: open-loop arrivals, closed-loop concurrency, agent chains.

A *unit* is one request, or all steps of one agent chain. Units are dispatched in workload order:
each waits for its arrival time (if it has one) and then for a concurrency slot (if a limit is
set); a chain holds its slot for all its steps. With a duration, no unit starts after it; units
in flight finish (bounded by the per-request timeout). Setting `stop` (Ctrl-C) cancels everything
in flight - those records end as "cancelled" - and returns the partial records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from splitserve.bench.client import OpenAIClient
from splitserve.bench.schema import RequestRecord
from splitserve.bench.workloads import RequestSpec, iter_units, tool_round_trip


@dataclass
class RunOutcome:
    records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0  # run start -> last request finished
    interrupted: bool = False


@dataclass
class LiveCounters:
    """Updated as requests finish; read by the progress display."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0


async def run_load(
    client: OpenAIClient,
    specs: Iterable[RequestSpec],
    *,
    concurrency: int | None = None,
    duration_s: float | None = None,
    stop: asyncio.Event | None = None,
    counters: LiveCounters | None = None,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> RunOutcome:
    stop = stop or asyncio.Event()
    counters = counters or LiveCounters()
    out = RunOutcome()
    records = out.records
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    tasks: set[asyncio.Task] = set()
    chat = client.endpoint == "chat"
    t_start = perf_counter()
    client.t_start = t_start
    deadline = t_start + duration_s if duration_s is not None else None

    async def run_unit(unit: list[RequestSpec]) -> None:
        try:
            convo: list[dict[str, Any]] = []
            calls: list[dict[str, Any]] = []  # tool-calling chains: the last step's calls
            for spec in unit:
                rec = RequestRecord(
                    request_id=spec.request_id,
                    start_s=perf_counter() - t_start,
                    expected_input_tokens=spec.input_len,
                    expected_output_tokens=spec.output_len,
                    chain_id=spec.chain_id,
                    step=spec.step,
                    num_steps=spec.num_steps,
                )
                records.append(rec)
                counters.started += 1
                if spec.messages is not None:
                    prompt: str | list[dict[str, str]] = list(spec.messages)
                else:
                    if spec.system and not convo:
                        convo.append({"role": "system", "content": spec.system})
                    content = spec.prompt if spec.prompt is not None else _filler(spec.input_len)
                    if calls:  # the chunk is the result of the calls the model just made
                        convo.extend(tool_round_trip(calls, content))
                    else:
                        convo.append({"role": "user", "content": content})
                    prompt = convo if chat or len(unit) > 1 or spec.system else convo[-1]["content"]
                calls = []
                tool_fields = ({"tools": list(spec.tools), "tool_choice": spec.tool_choice, "parallel_tool_calls": False}
                               if spec.tools else None)
                text = await client.request(rec, prompt, spec.output_len, tool_fields, calls)
                if rec.ok:
                    counters.completed += 1
                    counters.output_tokens += rec.output_tokens or 0
                else:
                    counters.failed += 1
                if on_record is not None:
                    on_record(rec)
                if not rec.ok:
                    break  # a chain stops at its first failed step
                if len(unit) > 1 and not calls:
                    convo.append({"role": "assistant", "content": text})
        finally:
            if sem is not None:
                sem.release()

    async def dispatch() -> None:
        for unit in iter_units(specs):
            if deadline is not None and perf_counter() >= deadline:
                return
            arrival = unit[0].arrival_s
            if arrival is not None:
                if deadline is not None and t_start + arrival >= deadline:
                    return
                delay = t_start + arrival - perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if sem is not None:
                await sem.acquire()
                if deadline is not None and perf_counter() >= deadline:
                    sem.release()
                    return
            task = asyncio.create_task(run_unit(unit))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(0)  # let it send before the next dispatch decision

    dispatcher = asyncio.create_task(dispatch())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({dispatcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        while tasks and not stop.is_set():
            await asyncio.wait(set(tasks) | {stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stop.is_set() or not dispatcher.done():
            out.interrupted = stop.is_set()
            dispatcher.cancel()
            for t in list(tasks):
                t.cancel()
        await asyncio.gather(dispatcher, *tasks, return_exceptions=True)
        stopper.cancel()
        await asyncio.gather(stopper, return_exceptions=True)
    if not dispatcher.cancelled() and dispatcher.exception() is not None:
        raise dispatcher.exception()  # a bug in the workload iterator, not a request error
    out.duration_s = perf_counter() - t_start
    records.sort(key=lambda r: r.request_id)
    return out


def _filler(n: int) -> str:
    """Prompt text when a spec carries lengths only (no TextSource): about n tokens of words."""
    return " ".join(["hello"] * max(1, n))
