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

    def finished(self, rec: RequestRecord) -> None:
        if rec.ok:
            self.completed += 1
            self.output_tokens += rec.output_tokens or 0
        else:
            self.failed += 1


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
            convo = _Conversation(multi_step=len(unit) > 1, chat=chat)
            for spec in unit:
                rec = _record_for(spec, perf_counter() - t_start)
                records.append(rec)
                counters.started += 1
                prompt = convo.prompt_for(spec)
                text = await client.request(rec, prompt, spec.output_len, _tool_fields(spec), convo.calls)
                counters.finished(rec)
                if on_record is not None:
                    on_record(rec)
                if not rec.ok:
                    break  # a chain stops at its first failed step
                convo.answered(text)
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


def _record_for(spec: RequestSpec, start_s: float) -> RequestRecord:
    return RequestRecord(
        request_id=spec.request_id,
        start_s=start_s,
        expected_input_tokens=spec.input_len,
        expected_output_tokens=spec.output_len,
        chain_id=spec.chain_id,
        step=spec.step,
        num_steps=spec.num_steps,
    )


def _tool_fields(spec: RequestSpec) -> dict[str, Any] | None:
    if not spec.tools:
        return None
    return {"tools": list(spec.tools), "tool_choice": spec.tool_choice, "parallel_tool_calls": False}


class _Conversation:
    """What one unit has said so far. An agent chain resends every earlier prompt and the model's
    answers (in tool-calling chains: its calls and, as their results, the next chunk)."""

    def __init__(self, *, multi_step: bool, chat: bool):
        self.multi_step = multi_step
        self.chat = chat
        self.messages: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []  # the current step's tool calls, filled in by the client

    def prompt_for(self, spec: RequestSpec) -> str | list[dict[str, Any]]:
        """The prompt of this step (a chat, or the completion text); starts a fresh list of calls."""
        prompt: str | list[dict[str, Any]]
        if spec.messages is not None:
            prompt = list(spec.messages)
        else:
            if spec.system and not self.messages:
                self.messages.append({"role": "system", "content": spec.system})
            content = spec.prompt if spec.prompt is not None else _filler(spec.input_len)
            if self.calls:  # the chunk is the result of the calls the model just made
                self.messages.extend(tool_round_trip(self.calls, content))
            else:
                self.messages.append({"role": "user", "content": content})
            prompt = self.messages if self.chat or self.multi_step or spec.system else self.messages[-1]["content"]
        self.calls = []
        return prompt

    def answered(self, text: str) -> None:
        """A step succeeded: a text answer becomes part of the chain's conversation (calls are sent
        back with the next step's chunk)."""
        if self.multi_step and not self.calls:
            self.messages.append({"role": "assistant", "content": text})


def _filler(n: int) -> str:
    """Prompt text when a spec carries lengths only (no TextSource): about n tokens of words."""
    return " ".join(["hello"] * max(1, n))
