"""The streaming client against the fake server: timing, token counts, every error kind."""

from __future__ import annotations

import asyncio
import socket

import pytest

from splitserve.bench.client import OpenAIClient, _SSESink, api_root
from splitserve.bench.fakeserver import Script
from splitserve.bench.http import BufferSink, _Conn
from splitserve.bench.schema import RequestRecord


def _client(srv, **kw) -> OpenAIClient:
    kw.setdefault("model", "fake-model")
    return OpenAIClient(srv.base_url, **kw)


async def _one(client: OpenAIClient, max_tokens: int = 8, prompt="hello world", rid: int = 0) -> RequestRecord:
    rec = RequestRecord(request_id=rid, start_s=0.0)
    await client.request(rec, prompt, max_tokens)
    return rec


def test_api_root():
    assert api_root("http://h:1") == api_root("http://h:1/") == api_root("http://h:1/v1/") == "http://h:1/v1"


async def test_scripted_timing_ttft_itl_tpot(fake_server):
    srv = await fake_server(Script(ttft_s=0.10, itl_s=0.02))
    async with _client(srv) as c:
        rec = await _one(c, max_tokens=6)
    assert rec.ok and rec.error is None and rec.http_status == 200
    # The role-only chunk arrives at once; TTFT is the first content chunk, 100 ms later.
    assert 100.0 <= rec.ttft_ms < 130.0
    assert len(rec.itl_ms) == 5
    assert all(10.0 < x < 40.0 for x in rec.itl_ms)
    assert sum(rec.itl_ms) == pytest.approx(100.0, abs=8.0)  # scheduled on absolute times
    assert rec.tpot_ms == pytest.approx(20.0, abs=2.5)
    assert rec.e2e_ms == pytest.approx(rec.ttft_ms + 100.0, abs=8.0)
    assert (rec.output_tokens, rec.token_source) == (6, "usage")
    assert rec.input_tokens == 2  # the fake server counts words
    body = srv.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == 6 and body["max_tokens"] == 6
    assert body["messages"] == [{"role": "user", "content": "hello world"}]


async def test_completions_endpoint_and_counts_without_usage(fake_server):
    srv = await fake_server(Script(usage=False, tokens_per_chunk=3))
    async with _client(srv, endpoint="completions", count_tokens=lambda s: len(s.split())) as c:
        rec = await _one(c, max_tokens=9)
        assert rec.ok and rec.token_source == "tokenizer" and rec.output_tokens == 9
        assert len(rec.itl_ms) == 2  # 3 chunks of 3 tokens
        assert srv.bodies[0]["prompt"] == "hello world"
    async with _client(srv, endpoint="completions") as c:
        rec = await _one(c, max_tokens=9)
        assert rec.token_source == "chunks" and rec.output_tokens == 3


async def test_multi_token_chunks_use_usage_for_tpot(fake_server):
    srv = await fake_server(Script(itl_s=0.01, tokens_per_chunk=4))
    async with _client(srv) as c:
        rec = await _one(c, max_tokens=8)
    assert rec.output_tokens == 8 and len(rec.itl_ms) == 1
    assert rec.tpot_ms == pytest.approx((rec.e2e_ms - rec.ttft_ms) / 7)


@pytest.mark.parametrize("script, kind", [
    (Script(status=500), "http_500"),
    (Script(status=429), "http_429"),
    (Script(disconnect_after=3), "disconnect"),
    (Script(truncate=True), "disconnect"),
    (Script(error_after=2), "stream_error"),
])
async def test_error_kinds_are_counted_not_raised(fake_server, script, kind):
    srv = await fake_server(script)
    async with _client(srv) as c:
        rec = await _one(c)
        assert not rec.ok and rec.error == kind and rec.e2e_ms is not None and rec.error_detail
        # the client (and its connection pool) keeps working after the error
        srv.script = Script()
        assert (await _one(c, rid=1)).ok


async def test_timeout(fake_server):
    srv = await fake_server(Script(hang=True))
    async with _client(srv, timeout_s=0.2) as c:
        rec = await _one(c)
    assert rec.error == "timeout" and 190 <= rec.e2e_ms < 1000


async def test_connect_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = OpenAIClient(f"http://127.0.0.1:{port}", model="m", timeout_s=5)
    rec = await _one(c)
    await c.close()
    assert rec.error == "connect"


async def test_rejected_extension_fields_are_dropped_and_retried(fake_server):
    rejecting = Script(status=400, error_message="Unrecognized request argument supplied: ignore_eos")
    srv = await fake_server(lambda i, body: rejecting if "ignore_eos" in body else Script())
    async with _client(srv) as c:
        rec = await _one(c)
        assert rec.ok and c.dropped_fields == ["ignore_eos"]
        assert "ignore_eos" not in srv.bodies[-1] and srv.bodies[-1]["min_tokens"] == 8
        assert (await _one(c, rid=1)).ok and srv.num_requests == 3
    # A 400 that names no field stays an error.
    srv2 = await fake_server(Script(status=400))
    async with _client(srv2) as c:
        assert (await _one(c)).error == "http_400" and srv2.num_requests == 1


async def test_keep_alive_reuses_connections(fake_server):
    srv = await fake_server(Script())
    async with _client(srv) as c:
        for i in range(5):
            assert (await _one(c, rid=i)).ok
        assert len(c._http._all) == 1
        recs = await asyncio.gather(*(_one(c, rid=10 + i) for i in range(8)))
        assert all(r.ok for r in recs)
        assert len(c._http._all) == 8


async def test_list_models(fake_server):
    srv = await fake_server(model="my-model")
    async with OpenAIClient(srv.base_url + "/v1", model=None) as c:
        assert await c.list_models() == ["my-model"]


async def test_cancellation_marks_record(fake_server):
    srv = await fake_server(Script(ttft_s=5.0))
    async with _client(srv) as c:
        rec = RequestRecord(request_id=0, start_s=0.0)
        task = asyncio.create_task(c.request(rec, "hi", 4))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rec.error == "cancelled" and not rec.ok


# ---------------------------------------------------------------------------------------------
# Parsers, fed byte by byte


CHAT_STREAM = (
    b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"lo"},"finish_reason":null}],"extra":1}\r\n\r\n'
    b'data: {"choices":[{"delta":{},\ndata: "finish_reason":"stop"}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_sse_sink_any_split(step):
    sink = _SSESink(chat=True, limit=1 << 20)
    sink.on_head(200, {})
    for i in range(0, len(CHAT_STREAM), step):
        sink.on_body(CHAT_STREAM[i:i + step], float(i))
    sink.close()
    assert sink.pieces == ["Hel", "lo"]
    assert sink.done and sink.finished
    assert sink.usage.completion_tokens == 2
    assert len(sink.itl) == 1


def test_sse_sink_final_event_without_blank_line():
    sink = _SSESink(chat=False, limit=1 << 20)
    sink.on_head(200, {})
    sink.on_body(b'data: {"choices":[{"text":"a"}]}\n\ndata: [DONE]', 0.0)
    sink.close()
    assert sink.done and sink.pieces == ["a"]


class _FakeTransport:
    def __init__(self):
        self.written = b""
        self.closed = False

    def write(self, data):
        self.written += data

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    abort = close


def _feed(conn: _Conn, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        piece = data[i:i + step]
        conn._mv[: len(piece)] = piece
        conn.buffer_updated(len(piece))


@pytest.mark.parametrize("step", [1, 3, 64, 10_000])
async def test_http_chunked_parsing_any_split(step):
    body = b"hello world, " * 5
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 9]), body[i:i + 9]) for i in range(0, len(body), 9))
    resp = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    conn = _Conn()
    conn.connection_made(_FakeTransport())
    sink = BufferSink()
    done = conn.start(sink, b"GET / HTTP/1.1\r\n\r\n")
    _feed(conn, resp, step)
    assert await done is True
    assert sink.status == 200 and bytes(sink.body) == body


async def test_http_content_length_and_close_framing():
    conn = _Conn()
    conn.connection_made(_FakeTransport())
    sink = BufferSink()
    done = conn.start(sink, b"")
    _feed(conn, b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope!", 4)
    assert await done is False and bytes(sink.body) == b"nope!" and sink.status == 404
    conn2 = _Conn()
    conn2.connection_made(_FakeTransport())
    sink2 = BufferSink()
    done2 = conn2.start(sink2, b"")
    _feed(conn2, b"HTTP/1.0 200 OK\r\n\r\nstream until close", 5)
    conn2.connection_lost(None)
    assert await done2 is False and bytes(sink2.body) == b"stream until close"


async def test_http_garbage_is_a_protocol_error():
    from splitserve.bench.http import ProtocolError

    conn = _Conn()
    conn.connection_made(_FakeTransport())
    done = conn.start(BufferSink(), b"")
    _feed(conn, b"SSH-2.0-OpenSSH\r\n\r\n", 100)
    with pytest.raises(ProtocolError):
        await done
