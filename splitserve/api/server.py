"""The OpenAI-compatible HTTP front: validation, tokenization, streaming, errors, metrics.

Pydantic lives here and nowhere else. Token generation happens in the engine worker; this
process turns tokens into text and text into SSE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitserve.cluster.gateway import Cluster, EngineDeadError, EngineRequestError
from splitserve.api.agent import chat_template_for, plan_request_tools, request_grammar
from splitserve.structured.tool_stream import ToolCallStream, chat_message
from splitserve.structured.grammar import GrammarError
from splitserve.api.generation import ChoiceState
from splitserve.api.metrics import ServerMetrics
from splitserve.api.protocol import ChatCompletionRequest, CompletionRequest
from splitserve.cluster.messages import TokenOut
from splitserve.engine.sampling_params import SamplingParams
from splitserve.models.tokenizer import Tokenizer

log = logging.getLogger("splitserve.api")

MAX_REQUEST_BYTES = 8 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code or str(self.status)),
                            status_code=self.status)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ServerState:
    client: Cluster
    tokenizer: Tokenizer
    model_name: str
    model_aliases: frozenset[str]
    max_model_len: int
    max_inflight: int
    api_key: str | None
    metrics: ServerMetrics
    started: float
    admitted: int = 0  # sub-requests accepted and not yet answered: the bounded queue
    chat_template: str | None = None  # --chat-template FILE's text
    tool_call_parser: str | None = None  # --tool-call-parser NAME (None: from the chat template)


class Admission:
    """A claim on `n` seats of the bounded queue, released exactly once."""

    def __init__(self, state: ServerState, n: int) -> None:
        if state.admitted + n > state.max_inflight:
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


@dataclass
class SubRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    choice: ChoiceState


# ---- ASGI guards -------------------------------------------------------------------------------
class BodySizeLimit:
    """Reject bodies over the limit before they are buffered, declared length or not."""

    def __init__(self, app, limit: int = MAX_REQUEST_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body exceeds {self.limit} bytes")
            return msg

        return await self.app(scope, limited_receive, send)

    async def _reject(self, send):
        body = json.dumps(error_body(f"request body exceeds {self.limit} bytes", "invalid_request_error",
                                     code="413")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def build_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="splitserve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.s = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        state.metrics.request_errors.labels(state.model_name, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else first.get("msg", "invalid request")
        state.metrics.request_errors.labels(state.model_name, "400").inc()
        return JSONResponse(error_body(msg, "invalid_request_error", loc or None, "400"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=str(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        state.metrics.request_errors.labels(state.model_name, "500").inc()
        return JSONResponse(error_body("internal server error", "internal_error", code="500"), status_code=500)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if state.client.healthy:
            return Response(status_code=200)
        return JSONResponse(error_body("engine not ready", "service_unavailable", code="503"), status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/cluster")
    async def cluster(request: Request):
        authorize(request)
        info = state.client.info()
        info["gateway_inflight"] += state.admitted
        return info

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "splitserve",
            "root": state.model_name, "max_model_len": state.max_model_len,
        }]}

    async def parse(request: Request, cls):
        authorize(request)
        try:
            body = await request.json()
        except APIError:
            raise
        except Exception:
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            req = cls.model_validate(body)
        except Exception as exc:
            from pydantic import ValidationError

            if isinstance(exc, ValidationError):
                raise RequestValidationError(exc.errors()) from None
            raise
        if req.model is not None and req.model not in state.model_aliases:
            raise APIError(404, f"the model `{req.model}` does not exist", "not_found_error", "model", "model_not_found")
        try:
            req.check_unsupported()
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return req

    def build_subrequests(base_id: str, prompts: list[list[int]], req, requested_max: int | None,
                          logprobs: int | None, forced_grammar=None) -> list[SubRequest]:
        try:
            grammar = request_grammar(req)  # every choice obeys it (n > 1 included)
        except GrammarError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        if forced_grammar is not None and grammar is not None:
            raise APIError(400, "a forced tool_choice cannot be combined with response_format or structured_outputs",
                           param="tool_choice")
        grammar = forced_grammar or grammar
        subs = []
        for p_idx, prompt_ids in enumerate(prompts):
            if not prompt_ids:
                raise APIError(400, "the prompt is empty after tokenization", param="prompt")
            if any(not 0 <= t < state.tokenizer.vocab_size for t in prompt_ids):
                raise APIError(400, f"prompt token ids must be in [0, {state.tokenizer.vocab_size})", param="prompt")
            room = state.max_model_len - len(prompt_ids)
            max_tokens = requested_max if requested_max is not None else room
            if room < 1 or max_tokens > room:
                raise APIError(400, (
                    f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
                    f"{len(prompt_ids) + max(max_tokens, 1)} tokens ({len(prompt_ids)} in the prompt, "
                    f"{max(max_tokens, 1)} for the completion). Please reduce the prompt or max_tokens."),
                    param="max_tokens")
            try:
                params = dataclasses.replace(req.sampling_params(max_tokens, logprobs), grammar=grammar)
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

    async def run_subrequests(subs: list[SubRequest], t0: float) -> AsyncIterator[tuple[SubRequest, str, list]]:
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

    # ---- logprobs rendering ----------------------------------------------------------------
    tok = state.tokenizer

    def chat_logprobs(entries) -> list[dict]:
        return [{
            "token": tok.token_text(e.token_id), "logprob": e.logprob, "bytes": tok.token_bytes(e.token_id),
            "top_logprobs": [{"token": tok.token_text(t), "logprob": lp, "bytes": tok.token_bytes(t)} for t, lp in e.top],
        } for e in entries]

    def completion_logprobs(entries, text_offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        pos = text_offset
        for e in entries:
            t = tok.token_text(e.token_id)
            tokens.append(t)
            token_lps.append(e.logprob)
            tops.append({tok.token_text(i): lp for i, lp in e.top} if e.top else None)
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    # ---- non-streaming collection with disconnect detection --------------------------------
    async def collect(request: Request, subs: list[SubRequest], t0: float) -> None:
        async def consume():
            async for _ in run_subrequests(subs, t0):
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
                work.cancel()  # client left: cancelling frees the engine's blocks
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

    # ---- chat ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        template = chat_template_for(state.chat_template, tok.chat_template, req.tools)
        try:
            tool_plan = plan_request_tools(req, state.tool_call_parser, template or tok.chat_template)
        except (GrammarError, ValueError) as exc:
            raise APIError(400, str(exc), param=getattr(exc, "param", "tools")) from None
        try:
            messages = req.template_messages()
            kwargs = dict(req.chat_template_kwargs or {})
            prompt_text = tok.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                tools=req.tools, continue_final_message=req.continue_final_message, chat_template=template, **kwargs)
        except ValueError as exc:
            raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None
        # The template already spells BOS where the model wants it.
        prompt_ids = tok.encode(prompt_text, add_special_tokens=False)
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        subs = build_subrequests(base_id, [prompt_ids], req, req.requested_max_tokens(), req.requested_logprobs(),
                                 tool_plan.grammar if tool_plan else None)
        admission = Admission(state, len(subs))
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = stream_events(chat_stream(base_id, created, subs, include_usage, t0, tool_plan))
            return StreamingResponse(AdmittedStream(body, admission), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            await collect(request, subs, t0)
        finally:
            admission.release()
        choices = []
        for s in subs:
            c = s.choice
            message, finish_reason = chat_message(c.text, c.finish_reason, tool_plan)
            choices.append({
                "index": c.index,
                "message": message,
                "logprobs": {"content": chat_logprobs(c.logprobs)} if s.params.logprobs is not None else None,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            })
        return {"id": base_id, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": usage(subs)}

    async def chat_stream(base_id, created, subs, include_usage, t0, tool_plan=None) -> AsyncIterator[str]:
        head = {"id": base_id, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
        for s in subs:
            yield sse({**head, "choices": [{"index": s.choice.index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        tool_streams = ({s.choice.index: ToolCallStream(tool_plan) for s in subs}
                        if tool_plan is not None and tool_plan.parses_calls else {})
        async for sub, delta, lps in run_subrequests(subs, t0):
            c = sub.choice
            if not delta and not lps and c.finish_reason is None:
                continue
            if tool_streams:  # content until a call may be starting, then tool-call deltas
                deltas, finish_reason = tool_streams[c.index].deltas(delta, c.finish_reason)
            else:
                deltas, finish_reason = ([{"content": delta}] if delta else []), c.finish_reason
            if not deltas and not lps and finish_reason is None:
                continue
            for i, d in enumerate(deltas or [{}]):
                last = i == max(len(deltas), 1) - 1
                choice = {"index": c.index, "delta": d,
                          "logprobs": ({"content": chat_logprobs(lps)}
                                       if i == 0 and sub.params.logprobs is not None and lps else None),
                          "finish_reason": finish_reason if last else None}
                if last and finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                yield sse({**head, "choices": [choice]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(subs)})

    # ---- completions -----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        req: CompletionRequest = await parse(request, CompletionRequest)
        try:
            raw_prompts = req.prompts()
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        if len(raw_prompts) * req.n > 64:
            raise APIError(400, "at most 64 completions (prompts x n) per request", param="prompt")
        prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in raw_prompts]
        base_id = f"cmpl-{uuid.uuid4().hex}"
        subs = build_subrequests(base_id, prompts, req, req.max_tokens, req.logprobs)
        admission = Admission(state, len(subs))
        echo_text = {}
        if req.echo:
            for s in subs:
                echo_text[s.choice.index] = tok.decode(s.prompt_ids, skip_special_tokens=False)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = stream_events(completion_stream(base_id, created, subs, include_usage, echo_text, t0))
            return StreamingResponse(AdmittedStream(body, admission), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            await collect(request, subs, t0)
        finally:
            admission.release()
        choices = []
        for s in subs:
            c = s.choice
            prefix = echo_text.get(c.index, "")
            choices.append({
                "index": c.index, "text": prefix + c.text,
                "logprobs": completion_logprobs(c.logprobs, len(prefix)) if s.params.logprobs is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            })
        return {"id": base_id, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": usage(subs)}

    async def completion_stream(base_id, created, subs, include_usage, echo_text, t0) -> AsyncIterator[str]:
        head = {"id": base_id, "object": "text_completion", "created": created, "model": state.model_name}
        offsets = {s.choice.index: len(echo_text.get(s.choice.index, "")) for s in subs}
        for idx, text in echo_text.items():
            yield sse({**head, "choices": [{"index": idx, "text": text, "logprobs": None, "finish_reason": None}]})
        async for sub, delta, lps in run_subrequests(subs, t0):
            c = sub.choice
            if not delta and not lps and c.finish_reason is None:
                continue
            lp = None
            if sub.params.logprobs is not None and lps:
                lp = completion_logprobs(lps, offsets[c.index])
            offsets[c.index] += len(delta)
            choice = {"index": c.index, "text": delta, "logprobs": lp, "finish_reason": c.finish_reason}
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            yield sse({**head, "choices": [choice]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(subs)})

    return BodySizeLimitApp(app)


def BodySizeLimitApp(app: FastAPI):
    wrapped = BodySizeLimit(app)
    wrapped.state = app.state  # tests reach the state through the app
    return wrapped
