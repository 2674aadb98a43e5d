"""Async streaming client for OpenAI-compatible endpoints, timed at the client.

One aiohttp session, one request per call, Server-Sent Events parsed by hand from raw network
reads (no per-line awaits): each read is timestamped once with time.perf_counter, and every
content chunk in it gets that time. msgspec decodes each event into small typed structs that
ignore unknown fields. Every failure becomes an error kind on the record, never an exception
out of `request` (except cancellation, which marks the record "cancelled" and propagates).
"""

from __future__ import annotations

import asyncio
import json
from time import perf_counter
from typing import Any

import aiohttp
import msgspec

from splitserve.bench.schema import RequestRecord


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None


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
        max_connections: int = 0,
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
        self.max_connections = max_connections
        self.ignore_eos = ignore_eos
        self.min_tokens = min_tokens
        self.extra_body = dict(extra_body or {})
        self.max_response_bytes = max_response_bytes
        self.count_tokens = count_tokens  # text -> int, for outputs when the server sends no usage
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.headers.update(headers or {})
        self.t_start = perf_counter()  # the run's zero; the runner resets it
        self.dropped_fields: list[str] = []  # extension fields the server rejected
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(self.timeout_s, 60.0)),
                auto_decompress=True,
                read_bufsize=1 << 18,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def list_models(self) -> list[str]:
        await self.start()
        assert self._session is not None
        async with asyncio.timeout(min(self.timeout_s, 30.0)):
            async with self._session.get(self.root + "/models", headers=self.headers) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
        return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]

    # ----------------------------------------------------------------------------------------

    def build_body(self, prompt: str | list[dict[str, str]], max_tokens: int) -> bytes:
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
        body.update(self.extra_body)
        if body.get("model") is None:
            del body["model"]
        return json.dumps(body, ensure_ascii=False).encode()

    async def request(
        self, rec: RequestRecord, prompt: str | list[dict[str, str]], max_tokens: int
    ) -> str:
        """Send one streaming request, fill `rec` in, return the generated text ('' on error)."""
        text = await self._request_once(rec, self.build_body(prompt, max_tokens))
        if rec.http_status == 400 and rec.error_detail:
            # A server that rejects the vLLM extensions (a cloud API): drop them and retry once.
            rejected = [f for f in ("ignore_eos", "min_tokens") if f in rec.error_detail and f not in self.dropped_fields]
            if rejected:
                self.dropped_fields.extend(rejected)
                _reset(rec)
                text = await self._request_once(rec, self.build_body(prompt, max_tokens))
        return text

    async def _request_once(self, rec: RequestRecord, body: bytes) -> str:
        if self._session is None:
            await self.start()
        session = self._session
        assert session is not None
        headers = dict(self.headers)
        headers["X-Request-Id"] = f"splitserve-bench-{rec.request_id}"
        pieces: list[str] = []
        itl = rec.itl_ms
        first = last = 0.0
        got_first = done = finished = False
        usage: _Usage | None = None
        chat = self.endpoint == "chat"
        t0 = perf_counter()
        rec.start_s = t0 - self.t_start
        try:
            async with asyncio.timeout(self.timeout_s):
                async with session.post(self.url, data=body, headers=headers) as resp:
                    rec.http_status = resp.status
                    if resp.status != 200:
                        detail = await resp.content.read(4096)
                        rec.error = f"http_{resp.status}"
                        rec.error_detail = detail.decode("utf-8", "replace")[:MAX_ERROR_DETAIL]
                        rec.e2e_ms = (perf_counter() - t0) * 1000.0
                        return ""
                    tail = b""
                    pending: list[bytes] = []
                    nbytes = 0
                    limit = self.max_response_bytes
                    async for data in resp.content.iter_any():
                        now = perf_counter()
                        nbytes += len(data)
                        if nbytes > limit:
                            raise _ProtocolError(f"response larger than {limit} bytes")
                        if tail:
                            data = tail + data
                        lines = data.split(b"\n")
                        tail = lines.pop()
                        if len(tail) > limit:
                            raise _ProtocolError("SSE line too long")
                        for line in lines:
                            if line.startswith(b"data:"):
                                pending.append(line[5:])
                                continue
                            if line and line != b"\r" or not pending:
                                continue  # comment, other field, or an empty keep-alive
                            payload = (pending[0] if len(pending) == 1 else b"\n".join(pending)).strip()
                            pending = []
                            if payload == b"[DONE]":
                                done = True
                                continue
                            chunk = _decode(payload)
                            if chunk.error is not None:
                                raise _StreamError(str(chunk.error))
                            if chunk.usage is not None:
                                usage = chunk.usage
                            for choice in chunk.choices:
                                if chat:
                                    d = choice.delta
                                    piece = (d.content or d.reasoning_content) if d is not None else None
                                else:
                                    piece = choice.text
                                if piece:
                                    if got_first:
                                        itl.append((now - last) * 1000.0)
                                    else:
                                        got_first = True
                                        first = now
                                    last = now
                                    pieces.append(piece)
                                if choice.finish_reason:
                                    finished = True
                    # Lenient end: a final event without its blank line.
                    if tail.startswith(b"data:"):
                        pending.append(tail[5:])
                    if pending and b"".join(pending).strip() == b"[DONE]":
                        done = True
            end = perf_counter()
        except asyncio.CancelledError:
            rec.error = "cancelled"
            rec.e2e_ms = (perf_counter() - t0) * 1000.0
            raise
        except TimeoutError:
            return _fail(rec, t0, "timeout", f"no complete response within {self.timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            return _fail(rec, t0, "connect", str(exc))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError,
                ConnectionError) as exc:
            return _fail(rec, t0, "disconnect", f"{type(exc).__name__}: {exc}")
        except _StreamError as exc:
            return _fail(rec, t0, "stream_error", str(exc))
        except (_ProtocolError, msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            return _fail(rec, t0, "protocol", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - counted, never fatal
            return _fail(rec, t0, "client_error", f"{type(exc).__name__}: {exc}")

        rec.e2e_ms = (end - t0) * 1000.0
        text = "".join(pieces)
        if not (done or finished):
            rec.error = "disconnect"
            rec.error_detail = "stream ended before [DONE] or a finish_reason"
            return text
        rec.ok = True
        if got_first:
            rec.ttft_ms = (first - t0) * 1000.0
        if usage is not None and usage.completion_tokens is not None:
            rec.output_tokens = usage.completion_tokens
            rec.input_tokens = usage.prompt_tokens
            rec.token_source = "usage"
        elif self.count_tokens is not None:
            rec.output_tokens = self.count_tokens(text) if text else 0
            rec.token_source = "tokenizer"
        else:
            rec.output_tokens = len(pieces)
            rec.token_source = "chunks"
        n = rec.output_tokens
        if got_first and n is not None and n >= 2:
            rec.tpot_ms = (rec.e2e_ms - rec.ttft_ms) / (n - 1)
        return text


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
