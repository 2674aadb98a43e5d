"""A minimal, fast HTTP/1.1 client for streaming responses (asyncio BufferedProtocol).

Why not aiohttp's streaming reader: with hundreds of token streams every SSE event is its own
network read, and per read aiohttp costs a 256 KiB `recv` allocation (asyncio's default for
plain protocols), a StreamReader feed and a coroutine wake-up. Here each read lands in a
per-connection buffer (`recv_into`, no allocation) and the body bytes go straight to a
synchronous sink (the SSE parser) from the protocol callback, timestamped once. That cuts the
client's cost per streamed token by about 2x (benchmarks/bench_overhead.py).

Scope: http:// and https:// (ssl default context), keep-alive connection reuse, Content-Length,
chunked and close-delimited bodies, no compression (we send Accept-Encoding: identity), no
proxies, no redirects. Every size is bounded; any violation raises an HTTPClientError subclass.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from time import perf_counter
from typing import Protocol
from urllib.parse import urlsplit

MAX_HEAD = 64 << 10
MAX_CHUNK_LINE = 1024
BUF_SIZE = 64 << 10


class HTTPClientError(Exception):
    pass


class ConnectError(HTTPClientError):
    pass


class DisconnectError(HTTPClientError):
    pass


class ProtocolError(HTTPClientError):
    pass


class Sink(Protocol):
    def on_head(self, status: int, headers: dict[str, str]) -> None: ...

    def on_body(self, data: bytes, now: float) -> None: ...


_IDLE, _HEAD, _BODY = 0, 1, 2
_CHUNKED, _LENGTH, _CLOSE = 0, 1, 2


class _Conn(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self._buf = bytearray(BUF_SIZE)
        self._mv = memoryview(self._buf)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.sink: Sink | None = None
        self.done: asyncio.Future | None = None
        self.received = 0  # bytes received for the current response
        self._state = _IDLE
        self._head = b""
        self._framing = _CLOSE
        self._left = 0  # content-length left, or bytes left in the current chunk
        self._crlf = False  # a chunk's trailing CRLF is still expected
        self._pend = b""  # incomplete chunk-size line
        self._keep = True

    # asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._mv

    def buffer_updated(self, nbytes: int) -> None:
        now = perf_counter()
        data = bytes(self._mv[:nbytes])
        if self._state == _IDLE or self.done is None or self.done.done():
            self._abort()  # bytes nobody asked for: the connection cannot be trusted
            return
        self.received += nbytes
        try:
            if self._state == _HEAD:
                self._on_head(data, now)
            else:
                self._on_body(data, now)
        except Exception as exc:  # noqa: BLE001 - a sink or framing error ends this response
            self._fail(exc if isinstance(exc, HTTPClientError) else exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            if self._state == _BODY and self._framing == _CLOSE:
                self._finish(False)
            else:
                self.done.set_exception(DisconnectError(f"connection closed by the server ({exc or 'EOF'})"))

    # request ----------------------------------------------------------------------------------
    def start(self, sink: Sink, request: bytes) -> asyncio.Future:
        assert self.transport is not None
        self.sink = sink
        self.done = asyncio.get_running_loop().create_future()
        self.received = 0
        self._state = _HEAD
        self._head = b""
        self._pend = b""
        self._crlf = False
        self.transport.write(request)
        return self.done

    def _on_head(self, data: bytes, now: float) -> None:
        head = self._head + data if self._head else data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD:
                raise ProtocolError("response head too large")
            self._head = head
            return
        self._head = b""
        lines = head[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ProtocolError(f"not an HTTP response: {lines[0][:80]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise ProtocolError(f"bad status line {lines[0][:80]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        rest = head[end + 4 :]
        if 100 <= status < 200:  # interim response: the real head follows
            if rest:
                self._on_head(rest, now)
            return
        conn = headers.get("connection", "").lower()
        self._keep = "close" not in conn and (parts[0] != "HTTP/1.0" or "keep-alive" in conn)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._framing, self._left = _CHUNKED, 0
        elif "content-length" in headers:
            try:
                self._framing, self._left = _LENGTH, int(headers["content-length"])
            except ValueError:
                raise ProtocolError("bad content-length") from None
        elif status in (204, 304):
            self._framing, self._left = _LENGTH, 0
        else:
            self._framing, self._keep = _CLOSE, False
        assert self.sink is not None
        self.sink.on_head(status, headers)
        self._state = _BODY
        if self._framing == _LENGTH and self._left == 0:
            self._finish(self._keep)
        elif rest:
            self._on_body(rest, now)

    def _on_body(self, data: bytes, now: float) -> None:
        sink = self.sink
        assert sink is not None
        if self._framing == _LENGTH:
            take = data[: self._left]
            self._left -= len(take)
            if take:
                sink.on_body(take, now)
            if self._left == 0:
                self._finish(self._keep and len(data) == len(take))
            return
        if self._framing == _CLOSE:
            sink.on_body(data, now)
            return
        # chunked
        buf = self._pend + data if self._pend else data
        self._pend = b""
        pos, n = 0, len(buf)
        out = []
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left:
                    break
                self._crlf = True
            if self._crlf:
                if n - pos < 2:
                    self._pend = buf[pos:]
                    pos = n
                    break
                pos += 2
                self._crlf = False
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                if n - pos > MAX_CHUNK_LINE:
                    raise ProtocolError("chunk size line too long")
                self._pend = buf[pos:]
                pos = n
                break
            try:
                size = int(buf[pos:nl].split(b";", 1)[0], 16)
            except ValueError:
                raise ProtocolError("bad chunk size") from None
            if size == 0:
                # last chunk; trailers (rare) end with an empty line - accept the common "\r\n"
                tail = buf[nl + 2 :]
                if out:
                    sink.on_body(out[0] if len(out) == 1 else b"".join(out), now)
                self._finish(self._keep and tail in (b"", b"\r\n"))
                return
            self._left = size
            pos = nl + 2
        if out:
            sink.on_body(out[0] if len(out) == 1 else b"".join(out), now)

    def _finish(self, keep: bool) -> None:
        self._state = _IDLE
        self.sink = None
        if not keep:
            self._abort(graceful=True)
        if self.done is not None and not self.done.done():
            self.done.set_result(keep)

    def _fail(self, exc: BaseException) -> None:
        self._state = _IDLE
        self.sink = None
        self._abort()
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    def _abort(self, graceful: bool = False) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close() if graceful else self.transport.abort()


class HTTPClient:
    """Keep-alive connections to one origin; `request` streams the body into a sink."""

    def __init__(self, base_url: str, *, connect_timeout: float = 60.0, max_idle: int = 4096):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"bad URL {base_url!r}: need http(s)://host[:port]")
        self.scheme = u.scheme
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.host_header = u.netloc.rsplit("@", 1)[-1]
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._ssl = ssl.create_default_context() if u.scheme == "https" else None
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Conn, self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectError(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self._all.add(conn)
        return conn

    def _request_bytes(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host_header}", "Accept-Encoding: identity"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes, sink: Sink) -> None:
        """Send a request and feed the response body to `sink` until it ends. Raises
        ConnectError, DisconnectError or ProtocolError; cancellation closes the connection."""
        raw = self._request_bytes(method, path, headers, body)
        for attempt in (0, 1):
            reused = False
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    reused = True
                    break
                self._all.discard(conn)
            else:
                conn = await self._connect()
            try:
                keep = await conn.start(sink, raw)
            except DisconnectError:
                self._all.discard(conn)
                # A reused keep-alive connection the server had already closed: retry once, fresh.
                if reused and conn.received == 0 and attempt == 0:
                    continue
                raise
            except BaseException:
                conn._abort()
                self._all.discard(conn)
                raise
            if keep and not conn.closed and len(self._idle) < self.max_idle:
                self._idle.append(conn)
            else:
                conn._abort(graceful=True)
                self._all.discard(conn)
            return

    async def close(self) -> None:
        for conn in list(self._all):
            conn._abort(graceful=True)
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)


class BufferSink:
    """Collects a (bounded) body: for small JSON responses."""

    def __init__(self, limit: int = 1 << 20):
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.limit = limit

    def on_head(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers

    def on_body(self, data: bytes, now: float) -> None:
        if len(self.body) + len(data) > self.limit:
            raise ProtocolError(f"response larger than {self.limit} bytes")
        self.body += data


Clock = Callable[[], float]
