"""Async streaming client for OpenAI-compatible endpoints, timed at the client.

Keep-alive HTTP/1.1 connections (splitserve.bench.http), one request per call, Server-Sent
Events parsed by hand inside the protocol callback as bytes arrive (no per-chunk awaits): each
network read is timestamped once with time.perf_counter, and every content chunk in it gets
that time. msgspec decodes each event into small typed structs that
ignore unknown fields. Every failure becomes an error kind on the record, never an exception
out of `request` (except cancellation, which marks the record "cancelled" and propagates).
"""

from __future__ import annotations

import asyncio
import json
from time import perf_counter
from typing import Any

import msgspec

from splitserve.bench.http import BufferSink, ConnectError, DisconnectError, HTTPClient, ProtocolError
from splitserve.bench.schema import RequestRecord


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_decode = msgspec.json.Decoder(_Chunk).decode

MAX_ERROR_DETAIL = 300


def api_root(base_url: str) -> str:
    """`http://h:p`, `http://h:p/`, `http://h:p/v1` -> `http://h:p/v1`."""
    root = base_url.rstrip("/")
    if not root.endswith("/v1"):
        root += "/v1"
    return root


class OpenAIClient:
    """Streams completions from `base_url` (with or without the trailing /v1)."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None,
        endpoint: str = "chat",
        api_key: str | None = None,
        timeout_s: float = 600.0,
        ignore_eos: bool = True,
        min_tokens: bool = True,
        extra_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        max_response_bytes: int = 64 << 20,
        count_tokens: Any = None,
    ):
        if endpoint not in ("chat", "completions"):
            raise ValueError("endpoint must be 'chat' or 'completions'")
        self.root = api_root(base_url)
        self.url = self.root + ("/chat/completions" if endpoint == "chat" else "/completions")
        self.model = model
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.ignore_eos = ignore_eos
        self.min_tokens = min_tokens
        self.extra_body = dict(extra_body or {})
        self.max_response_bytes = max_response_bytes
        self.count_tokens = count_tokens  # text -> int, for outputs when the server sends no usage
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                        "User-Agent": "splitserve-bench"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.headers.update(headers or {})
        self.t_start = perf_counter()  # the run's zero; the runner resets it
        self.dropped_fields: list[str] = []  # extension fields the server rejected
        self._http = HTTPClient(self.root, connect_timeout=min(timeout_s, 60.0))
        self._path = self._http_path(self.url)

    @staticmethod
    def _http_path(url: str) -> str:
        from urllib.parse import urlsplit

        u = urlsplit(url)
        return u.path + (f"?{u.query}" if u.query else "")

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def list_models(self) -> list[str]:
        sink = BufferSink()
        async with asyncio.timeout(min(self.timeout_s, 30.0)):
            await self._http.request("GET", self._http_path(self.root + "/models"), self.headers, b"", sink)
        if sink.status != 200:
            raise ConnectError(f"GET /models answered HTTP {sink.status}")
        data = json.loads(bytes(sink.body))
        return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]

    # ----------------------------------------------------------------------------------------

    def build_body(self, prompt: str | list[dict[str, Any]], max_tokens: int, fields: dict | None = None) -> bytes:
        body: dict[str, Any] = {"model": self.model}
        if self.endpoint == "chat":
            body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt if isinstance(prompt, str) else _flatten(prompt)
        body["max_tokens"] = max_tokens
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if self.ignore_eos and "ignore_eos" not in self.dropped_fields:
            body["ignore_eos"] = True
        if self.min_tokens and "min_tokens" not in self.dropped_fields:
            body["min_tokens"] = max_tokens
        body.update(fields or {})
        body.update(self.extra_body)
        if body.get("model") is None:
            del body["model"]
        return json.dumps(body, ensure_ascii=False).encode()

    async def request(
        self, rec: RequestRecord, prompt: str | list[dict[str, Any]], max_tokens: int,
        fields: dict | None = None, tool_calls: list | None = None,
    ) -> str:
        """Send one streaming request, fill `rec` in, return the generated text ('' on error).
        `fields`: more body fields (tools); `tool_calls`: filled with the streamed tool calls."""
        text = await self._request_once(rec, self.build_body(prompt, max_tokens, fields), tool_calls)
        if rec.http_status == 400 and rec.error_detail:
            # A server that rejects the vLLM extensions (a cloud API): drop them and retry once.
            rejected = [f for f in ("ignore_eos", "min_tokens") if f in rec.error_detail and f not in self.dropped_fields]
            if rejected:
                self.dropped_fields.extend(rejected)
                _reset(rec)
                text = await self._request_once(rec, self.build_body(prompt, max_tokens, fields), tool_calls)
        return text

    async def _request_once(self, rec: RequestRecord, body: bytes, tool_calls: list | None = None) -> str:
        headers = dict(self.headers)
        headers["X-Request-Id"] = f"splitserve-bench-{rec.request_id}"
        sink = _SSESink(self.endpoint == "chat", self.max_response_bytes)
        t0 = perf_counter()
        rec.start_s = t0 - self.t_start
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._http.request("POST", self._path, headers, body, sink)
            end = perf_counter()
        except asyncio.CancelledError:
            rec.error = "cancelled"
            rec.e2e_ms = (perf_counter() - t0) * 1000.0
            raise
        except TimeoutError:
            return _fail(rec, t0, "timeout", f"no complete response within {self.timeout_s:g} s")
        except ConnectError as exc:
            return _fail(rec, t0, "connect", str(exc))
        except (DisconnectError, ConnectionError) as exc:
            if sink.status and sink.status != 200:
                return _http_fail(rec, t0, sink)
            return _fail(rec, t0, "disconnect", str(exc))
        except _StreamError as exc:
            return _fail(rec, t0, "stream_error", str(exc))
        except (ProtocolError, msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            return _fail(rec, t0, "protocol", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - counted, never fatal
            return _fail(rec, t0, "client_error", f"{type(exc).__name__}: {exc}")

        rec.http_status = sink.status
        if sink.status != 200:
            return _http_fail(rec, t0, sink)
        sink.close()
        rec.e2e_ms = (end - t0) * 1000.0
        rec.itl_ms = sink.itl
        text = "".join(sink.pieces)
        if tool_calls is not None:
            tool_calls.extend(sink.calls[i] for i in sorted(sink.calls))
        if not (sink.done or sink.finished):
            rec.error = "disconnect"
            rec.error_detail = "stream ended before [DONE] or a finish_reason"
            return text
        rec.ok = True
        if sink.got_first:
            rec.ttft_ms = (sink.first - t0) * 1000.0
        usage = sink.usage
        if usage is not None and usage.completion_tokens is not None:
            rec.output_tokens = usage.completion_tokens
            rec.input_tokens = usage.prompt_tokens
            rec.token_source = "usage"
        elif self.count_tokens is not None:
            rec.output_tokens = self.count_tokens(text) if text else 0
            rec.token_source = "tokenizer"
        else:
            rec.output_tokens = len(sink.pieces)
            rec.token_source = "chunks"
        n = rec.output_tokens
        if sink.got_first and n is not None and n >= 2:
            rec.tpot_ms = (rec.e2e_ms - rec.ttft_ms) / (n - 1)
        return text


class _SSESink:
    """Parses a Server-Sent Events body as it arrives; called from the protocol, synchronously.

    Every network read arrives with one timestamp `now`; each event carrying content in that
    read is a token chunk at `now`. The role-only first chunk of chat streams (empty content)
    does not count. Multi-line `data:` fields are joined per the SSE spec.
    """

    __slots__ = ("chat", "limit", "status", "nbytes", "tail", "pending", "pieces", "itl", "first", "last",
                 "got_first", "done", "finished", "usage", "error_body", "calls")

    def __init__(self, chat: bool, limit: int):
        self.chat = chat
        self.limit = limit
        self.status = 0
        self.nbytes = 0
        self.tail = b""
        self.pending: list[bytes] = []
        self.pieces: list[str] = []
        self.calls: dict[int, dict] = {}  # streamed tool calls by index, reassembled
        self.itl: list[float] = []
        self.first = self.last = 0.0
        self.got_first = self.done = self.finished = False
        self.usage: _Usage | None = None
        self.error_body = b""

    def on_head(self, status: int, headers: dict[str, str]) -> None:
        self.status = status

    def on_body(self, data: bytes, now: float) -> None:
        if self.status != 200:
            if len(self.error_body) < 4096:
                self.error_body += data[: 4096 - len(self.error_body)]
            return
        self.nbytes += len(data)
        if self.nbytes > self.limit:
            raise ProtocolError(f"response larger than {self.limit} bytes")
        if self.tail:
            data = self.tail + data
        lines = data.split(b"\n")
        self.tail = lines.pop()
        pending = self.pending
        for line in lines:
            if line.startswith(b"data:"):
                pending.append(line[5:])
            elif pending and (not line or line == b"\r"):
                payload = (pending[0] if len(pending) == 1 else b"\n".join(pending)).strip()
                pending.clear()
                self._event(payload, now)

    def close(self) -> None:
        """End of body: a final event without its blank line is still taken."""
        if self.tail.startswith(b"data:"):
            self.pending.append(self.tail[5:])
            self.tail = b""
        if self.pending:
            payload = b"\n".join(self.pending).strip()
            self.pending.clear()
            self._event(payload, perf_counter())

    def _tool_call_pieces(self, deltas: list[_ToolCallDelta]) -> str:
        """Fold tool-call deltas in; their text counts as output for the timing."""
        return "".join(_fill_call(self.calls, tc) for tc in deltas)

    def _event(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        if not payload:
            return
        chunk = _decode(payload)
        if chunk.error is not None:
            raise _StreamError(str(chunk.error)[:MAX_ERROR_DETAIL])
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            if self.chat:
                d = choice.delta
                piece = (d.content or d.reasoning_content) if d is not None else None
                if d is not None and d.tool_calls:
                    piece = piece or self._tool_call_pieces(d.tool_calls)
            else:
                piece = choice.text
            if piece:
                if self.got_first:
                    self.itl.append((now - self.last) * 1000.0)
                else:
                    self.got_first = True
                    self.first = now
                self.last = now
                self.pieces.append(piece)
            if choice.finish_reason:
                self.finished = True


def _fill_call(calls: dict[int, dict], tc: _ToolCallDelta) -> str:
    slot = calls.setdefault(tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    if tc.id:
        slot["id"] = tc.id
    fn = tc.function
    if fn is not None:
        slot["function"]["name"] += fn.name or ""
        slot["function"]["arguments"] += fn.arguments or ""
        return (fn.name or "") + (fn.arguments or "")
    return ""


def _http_fail(rec: RequestRecord, t0: float, sink: _SSESink) -> str:
    rec.http_status = sink.status
    return _fail(rec, t0, f"http_{sink.status}", sink.error_body.decode("utf-8", "replace"))


class _ProtocolError(Exception):
    pass


class _StreamError(Exception):
    pass


def _fail(rec: RequestRecord, t0: float, kind: str, detail: str) -> str:
    rec.ok = False
    rec.error = kind
    rec.error_detail = detail[:MAX_ERROR_DETAIL]
    rec.e2e_ms = (perf_counter() - t0) * 1000.0
    return ""


def _reset(rec: RequestRecord) -> None:
    rec.ok = False
    rec.error = rec.error_detail = None
    rec.http_status = None
    rec.ttft_ms = rec.e2e_ms = rec.tpot_ms = None
    rec.itl_ms.clear()


def _flatten(messages: list[dict[str, str]]) -> str:
    return "\n\n".join(m.get("content", "") for m in messages)
