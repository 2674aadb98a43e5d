"""The one request path both endpoints share: admission, sub-requests (prompts x n), merged token
streams, disconnect handling, SSE, usage. An `Endpoint` adapter says only what differs: how the
prompts are built and how a choice, a chunk and the opening chunks look."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from splitserve.api.errors import APIError, error_body
from splitserve.api.generation import ChoiceState
from splitserve.cluster.gateway import EngineDeadError, EngineRequestError
from splitserve.cluster.messages import TokenOut
from splitserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from splitserve.api.server import ServerState


@dataclass
class SubRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    choice: ChoiceState


class Endpoint(Protocol):
    """What one endpoint adds to the shared path (see endpoints.py)."""

    id_prefix: str  # "chatcmpl" / "cmpl"
    object_name: str  # of a whole response
    chunk_object: str  # of a streamed chunk
    requested_max_tokens: int | None
    requested_logprobs: int | None
    grammar: object  # a structured.spec.GrammarSpec every choice obeys, or None

    async def prompts(self) -> list[list[int]]: ...
    def opening_choices(self, subs: list[SubRequest]) -> list[dict]: ...
    def delta_choice(self, sub: SubRequest, delta: str, logprobs: list) -> dict: ...
    def final_choice(self, sub: SubRequest) -> dict: ...


class Admission:
    """A claim on `n` seats of the bounded queue, released exactly once."""

    def __init__(self, state: ServerState, n: int) -> None:
        if state.admitted + n > state.inflight_limit():
            raise APIError(503, "the server is overloaded; retry later", "service_unavailable", code="overloaded")
        state.admitted += n
        self.state, self.n = state, n

    def release(self) -> None:
        if self.n:
            self.state.admitted -= self.n
            self.n = 0


class AdmittedStream:
    """An SSE body that gives its seats back however it ends: done, error, disconnect, or never started."""

    def __init__(self, gen, admission: Admission) -> None:
        self.gen, self.admission = gen, admission

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.gen.__anext__()
        except BaseException:
            self.admission.release()
            raise

    def __del__(self) -> None:
        self.admission.release()


async def serve(state: ServerState, request: Request, req, endpoint: Endpoint):
    """Answer one validated request, streaming or not."""
    t0 = time.perf_counter()
    prompts = await endpoint.prompts()
    base_id = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
    subs = build_subrequests(state, base_id, prompts, req, endpoint)
    admission = Admission(state, len(subs))
    created = int(time.time())
    head = {"id": base_id, "object": endpoint.chunk_object, "created": created, "model": state.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = stream_events(stream_chunks(state, endpoint, head, subs, include_usage, t0))
        return StreamingResponse(AdmittedStream(body, admission), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        await collect(state, request, subs, t0)
    finally:
        admission.release()
    return {**head, "object": endpoint.object_name, "choices": [endpoint.final_choice(s) for s in subs],
            "usage": usage(subs)}


def build_subrequests(state: ServerState, base_id: str, prompts: list[list[int]], req,
                      endpoint: Endpoint) -> list[SubRequest]:
    subs = []
    requested_max = endpoint.requested_max_tokens
    for p_idx, prompt_ids in enumerate(prompts):
        if not prompt_ids:
            raise APIError(400, "the prompt is empty after tokenization", param="prompt")
        room = state.max_model_len - len(prompt_ids)
        max_tokens = requested_max if requested_max is not None else room
        if room < 1 or max_tokens > room:
            raise APIError(400, (
                f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max(max_tokens, 1)} tokens ({len(prompt_ids)} in the prompt, "
                f"{max(max_tokens, 1)} for the completion). Please reduce the prompt or max_tokens."),
                param="max_tokens")
        try:
            params = dataclasses.replace(req.sampling_params(max_tokens, endpoint.requested_logprobs),
                                         grammar=endpoint.grammar)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        for j in range(req.n):
            # One user seed gives n different but reproducible choices.
            seed = (req.seed + j) & (2**63 - 1) if req.seed is not None else random.getrandbits(63)
            idx = p_idx * req.n + j
            subs.append(SubRequest(f"{base_id}-{idx}", prompt_ids, params, seed,
                                   ChoiceState(idx, params, state.tokenizer)))
    if not state.client.healthy:
        raise APIError(503, "the engine is not ready; retry later", "service_unavailable", code="unavailable")
    return subs


async def run_subrequests(state: ServerState, subs: list[SubRequest],
                          t0: float) -> AsyncIterator[tuple[SubRequest, str, list]]:
    """Merge the sub-requests' token streams. Yields (sub, text delta, new logprob entries)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    last_time: dict[str, float] = {}
    m = state.metrics

    async def pump(sub: SubRequest):
        try:
            async for out in state.client.generate(sub.request_id, sub.prompt_ids, sub.params, sub.seed):
                queue.put_nowait((sub, out))
        except Exception as exc:  # surfaced to the consumer, which decides the status
            queue.put_nowait((sub, exc))
        finally:
            queue.put_nowait((sub, done))

    tasks = [asyncio.create_task(pump(s)) for s in subs]
    remaining = len(subs)
    try:
        while remaining:
            sub, item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            choice = sub.choice
            if choice.finish_reason is not None:
                continue  # tokens that raced a stop string
            out: TokenOut = item
            now = time.perf_counter()
            if out.token is not None:
                prev = last_time.get(sub.request_id)
                if prev is None:
                    m.ttft.labels(state.model_name).observe(now - t0)
                else:
                    m.itl.labels(state.model_name).observe(now - prev)
                last_time[sub.request_id] = now
            n_lp = len(choice.logprobs)
            if choice.add(out):
                await state.client.finish_stream(sub.request_id, stopped=True)
            if choice.finish_reason is not None:
                m.e2e.labels(state.model_name).observe(now - t0)
                m.request_success.labels(state.model_name, choice.finish_reason).inc()
                m.prompt_tokens.labels(state.model_name).inc(choice.num_prompt_tokens)
                m.generation_tokens.labels(state.model_name).inc(choice.num_output_tokens)
            yield sub, choice.take_delta(), choice.logprobs[n_lp:]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def engine_error(exc: Exception) -> APIError:
    if isinstance(exc, EngineRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine failed while serving the request ({exc}); retry",
                        "service_unavailable", code="engine_failed")
    raise exc


def usage(subs: list[SubRequest]) -> dict:
    seen_prompts: dict[int, SubRequest] = {}
    for s in subs:
        seen_prompts.setdefault(id(s.prompt_ids), s)
    prompt = sum(len(s.prompt_ids) for s in seen_prompts.values())
    cached = sum(s.choice.num_cached_tokens for s in seen_prompts.values())
    completion = sum(s.choice.num_output_tokens for s in subs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def collect(state: ServerState, request: Request, subs: list[SubRequest], t0: float) -> None:
    """Run a non-streaming request to the end; a client that leaves cancels it (freeing its blocks)."""
    async def consume():
        async for _ in run_subrequests(state, subs, t0):
            pass

    async def disconnected():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work in done:
        exc = work.exception()
        if exc is not None:
            raise engine_error(exc)
    else:
        raise APIError(499, "client disconnected")


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def stream_events(gen: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in gen:
            yield chunk
    except (EngineDeadError, EngineRequestError) as exc:
        err = engine_error(exc)
        yield sse(error_body(err.message, err.type, code=err.code or str(err.status)))
    yield "data: [DONE]\n\n"


async def stream_chunks(state: ServerState, endpoint: Endpoint, head: dict, subs: list[SubRequest],
                        include_usage: bool, t0: float) -> AsyncIterator[str]:
    for choice in endpoint.opening_choices(subs):
        yield sse({**head, "choices": [choice]})
    async for sub, delta, lps in run_subrequests(state, subs, t0):
        c = sub.choice
        if not delta and not lps and c.finish_reason is None:
            continue
        made = endpoint.delta_choice(sub, delta, lps)
        for choice in made if isinstance(made, list) else [made]:  # tool calls: several deltas, or none yet
            if choice["finish_reason"] is not None:
                choice["stop_reason"] = c.stop_reason
            yield sse({**head, "choices": [choice]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(subs)})
