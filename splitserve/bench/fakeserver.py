"""A fast, scriptable fake OpenAI-compatible streaming server (raw asyncio, HTTP/1.1).

For tests (metric math against known delays, error handling) and for benchmarks/bench_overhead.py
(the client must not be the bottleneck). Serves GET /v1/models, POST /v1/chat/completions and
POST /v1/completions with `stream: true` only; answers loopback traffic it is pointed at and
nothing else.

Timing of a request with Script(ttft_s=T, itl_s=I) and n output tokens: the role-only chunk is
sent at once (it must not count as the first token), token k (0-based) at T + k*I after the
request was read, then a finish chunk, the usage chunk (if stream_options.include_usage) and
[DONE]. So TTFT = T, every ITL = I, TPOT = I, E2E = T + (n-1)*I, plus transport time.

    splitserve bench fake-server --port 8001 --ttft-ms 50 --itl-ms 10
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

MAX_HEADER = 64 << 10
MAX_BODY = 64 << 20
MAX_TIMINGS = 1_000_000


@dataclass
class Script:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    output_tokens: int | None = None  # None: the request's max_tokens (default 16)
    tokens_per_chunk: int = 1
    status: int = 200  # != 200: answer with this status and a JSON error body
    error_message: str | None = None  # that body's message
    disconnect_after: int | None = None  # abort the connection after this many tokens
    error_after: int | None = None  # send an in-stream error event after this many tokens
    hang: bool = False  # read the request, never answer
    usage: bool | None = None  # None: send usage iff stream_options.include_usage
    role_chunk: bool = True
    truncate: bool = False  # end the stream after the tokens without finish_reason or [DONE]


ScriptFn = Callable[[int, dict[str, Any]], Script]


class FakeOpenAIServer:
    def __init__(self, script: Script | ScriptFn | None = None, *, model: str = "fake-model", token_text: str = " hi"):
        self.script = script or Script()
        self.model = model
        self.token_text = token_text
        self.num_requests = 0
        self.active = 0  # completions being streamed now
        self.max_active = 0
        self.bodies: list[dict[str, Any]] = []  # the last 10,000 request bodies
        self.timings: dict[str, tuple[float, float]] = {}  # X-Request-Id -> (read, first token sent)
        self.port: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_HEADER, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def _script_for(self, index: int, body: dict[str, Any]) -> Script:
        return self.script(index, body) if callable(self.script) else self.script

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length > MAX_BODY:
                    await _respond(writer, 413, {"error": {"message": "body too large"}})
                    break
                body = await reader.readexactly(length) if length else b""
                t_recv = perf_counter()
                keep = headers.get("connection", "").lower() != "close"
                path = path.split("?", 1)[0].rstrip("/")
                if method == "GET" and path.endswith("/models"):
                    await _respond(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
                elif method == "GET" and path.endswith("/fake/timings"):
                    await _respond(writer, 200, {k: list(v) for k, v in self.timings.items()})
                elif method == "POST" and path.endswith("/completions"):
                    keep = await self._complete(writer, path.endswith("/chat/completions"), body, headers, t_recv) and keep
                else:
                    await _respond(writer, 404, {"error": {"message": f"no route {method} {path}"}})
                if not keep:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            if not writer.transport.is_closing():
                writer.transport.close()

    async def _complete(self, writer: asyncio.StreamWriter, chat: bool, raw: bytes, headers: dict[str, str], t_recv: float) -> bool:
        """Stream one completion; False when the connection must not be reused."""
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            await _respond(writer, 400, {"error": {"message": "invalid JSON body"}})
            return True
        index = self.num_requests
        self.num_requests += 1
        self.bodies.append(body)
        if len(self.bodies) > 10_000:
            del self.bodies[:5_000]
        s = self._script_for(index, body)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._stream(writer, chat, body, headers, t_recv, index, s)
        finally:
            self.active -= 1

    async def _stream(self, writer: asyncio.StreamWriter, chat: bool, body: dict[str, Any], headers: dict[str, str],
                      t_recv: float, index: int, s: Script) -> bool:
        if s.hang:
            await asyncio.sleep(3600)
            return False
        if s.status != 200:
            await _respond(writer, s.status, {"error": {"message": s.error_message or f"scripted status {s.status}"}})
            return True
        if not body.get("stream"):
            await _respond(writer, 400, {"error": {"message": "this fake server only streams"}})
            return True
        n = s.output_tokens if s.output_tokens is not None else int(body.get("max_tokens") or 16)
        include_usage = s.usage if s.usage is not None else bool((body.get("stream_options") or {}).get("include_usage"))
        prompt_tokens = _count_prompt(body, chat)
        rid = headers.get("x-request-id", f"fake-{index}")

        def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> bytes:
            obj: dict[str, Any] = {
                "id": f"cmpl-{index}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 0,
                "model": self.model,
                "choices": [choice] if choice is not None else [],
            }
            if usage is not None:
                obj["usage"] = usage
            data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
            return b"%x\r\n%s\r\n" % (len(data), data)

        piece = self.token_text * max(1, s.tokens_per_chunk)
        if chat:
            token_ev = event({"index": 0, "delta": {"content": piece}, "finish_reason": None})
            role_ev = event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            finish_ev = event({"index": 0, "delta": {}, "finish_reason": "length"})
        else:
            token_ev = event({"index": 0, "text": piece, "finish_reason": None})
            role_ev = b""
            finish_ev = event({"index": 0, "text": "", "finish_reason": "length"})

        transport = writer.transport
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        )
        if s.role_chunk and role_ev:
            writer.write(role_ev)
        loop = asyncio.get_running_loop()
        # perf_counter and loop.time() are both CLOCK_MONOTONIC on Linux; schedule on the loop clock
        base = loop.time() - (perf_counter() - t_recv)
        chunks = max(1, (n + s.tokens_per_chunk - 1) // s.tokens_per_chunk)
        t_first = 0.0
        for k in range(chunks):
            if s.disconnect_after is not None and k * s.tokens_per_chunk >= s.disconnect_after:
                transport.abort()
                return False
            if s.error_after is not None and k * s.tokens_per_chunk >= s.error_after:
                err = b'data: {"error":{"message":"scripted stream error","code":500}}\n\n'
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(err), err))
                return True
            delay = base + s.ttft_s + k * s.itl_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(token_ev)
            if k == 0:
                t_first = perf_counter()
            if transport.get_write_buffer_size() > 1 << 16:
                await writer.drain()
        if len(self.timings) < MAX_TIMINGS:
            self.timings[rid] = (t_recv, t_first)
        if s.truncate:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        tail = finish_ev
        if include_usage:
            tail += event(None, {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n})
        done = b"data: [DONE]\n\n"
        tail += b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done)
        writer.write(tail)
        await writer.drain()
        return True


def _count_prompt(body: dict[str, Any], chat: bool) -> int:
    """Whitespace-separated words of the prompt: a deterministic stand-in for prompt_tokens."""
    if chat:
        msgs = body.get("messages") or []
        text = " ".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
    else:
        p = body.get("prompt", "")
        text = p if isinstance(p, str) else " ".join(map(str, p))
    return len(text.split())


async def _respond(writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Payload Too Large"}.get(status, "Error")
    writer.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (status, reason.encode(), len(data), data)
    )
    await writer.drain()


class FakeServerThread:
    """Run a FakeOpenAIServer on its own event loop in a daemon thread (for synchronous callers).

        with FakeServerThread(Script(ttft_s=0.05)) as srv:
            run_cli(["--base-url", srv.base_url, ...])
    """

    def __init__(self, script: Script | ScriptFn | None = None, **kwargs: Any):
        self.server = FakeOpenAIServer(script, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fake-openai")

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def __enter__(self) -> FakeServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="splitserve bench fake-server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--model", default="fake-model")
    args = p.parse_args(argv)
    script = Script(ttft_s=args.ttft_ms / 1000, itl_s=args.itl_ms / 1000, tokens_per_chunk=args.tokens_per_chunk)

    async def serve() -> None:
        srv = FakeOpenAIServer(script, model=args.model)
        port = await srv.start(args.host, args.port)
        print(f"fake OpenAI server on http://{args.host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await srv.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0
