"""The TCP data channel for KV between hosts: sent from the prefill cache, received into the decode cache.

ZeroMQ frames cost two extra copies (gather into a frame before sending, land from the frame
after receiving). This channel moves the bytes between the caches and the kernel only:

  * sender: `sendmsg` with one buffer per run of consecutive cache slots, straight from the
    prefill worker's cache; whatever the socket cannot take right now is copied into a queue
    (the cache blocks may be reused after the step) and flushed when the socket is writable.
    A full socket never stalls the forward pass.
  * receiver: non-blocking; reads the header, asks where the chunk goes (runs of the decode
    worker's reserved slots) and `recv_into`s those slots directly. Chunks whose blocks are not
    reserved yet, or that need a dtype conversion, land in a scratch buffer instead.

Wire: a mutual HMAC-SHA256 challenge-response with a key derived from the cluster secret (the
secret never travels): the client sends MAGIC + its nonce; the server answers MAGIC + its nonce
+ HMAC(key, "server" | both nonces); the client checks that, then sends HMAC(key, "client" |
both nonces) and its chunks. A wrong magic, proof or a silent peer closes the connection; the
sender queues chunks (bounded) until the server has proven itself, so no call blocks on it.
Then per chunk: u32 header length, the msgpack KVChunk header, K bytes, V bytes; sizes come from
the header and are bounded. Nothing is unpickled. The channel is authenticated, not encrypted:
KV bytes cross the network in the clear (SECURITY.md).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import socket
import time
import struct
from typing import Callable

from splitserve.cluster import messages as m
from splitserve.cluster.logthrottle import ThrottledWarning
from splitserve.cluster.security import derive_keys

log = logging.getLogger("splitserve.kv.tcp")

MAGIC = b"SSKV0002"
NONCE_BYTES = 32
PROOF_BYTES = 32
HELLO_BYTES = len(MAGIC) + NONCE_BYTES  # client -> server
CHALLENGE_BYTES = len(MAGIC) + NONCE_BYTES + PROOF_BYTES  # server -> client
MAX_HEADER = 4096
MAX_CHUNK_BYTES = 1 << 30
MAX_QUEUED_BYTES = 512 << 20  # a receiver this far behind is treated as gone
MAX_CONNECTIONS = 256
AUTH_TIMEOUT_S = 5.0
IOV_MAX = 512
CONNECT_TIMEOUT_S = 5.0
_U32 = struct.Struct("<I")


def data_key(secret: bytes) -> bytes:
    return derive_keys(secret).data_key


def proof(key: bytes, who: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256 over the role and both nonces: proves the key without revealing it."""
    return hmac.new(key, who + client_nonce + server_nonce, hashlib.sha256).digest()


def chunk_bytes(hdr: m.KVChunk) -> int:
    """Bytes of K (and of V) that follow a header."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(hdr.dtype)
    if itemsize is None:
        raise ValueError(f"unsupported KV dtype {hdr.dtype!r}")
    n = hdr.num_tokens * hdr.num_kv_heads * hdr.head_dim * itemsize
    if hdr.num_tokens <= 0 or not 0 < 2 * n <= MAX_CHUNK_BYTES:
        raise ValueError(f"bad KV chunk size {hdr.num_tokens}x{hdr.num_kv_heads}x{hdr.head_dim}")
    return n


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


# ---- sending side ----------------------------------------------------------------------------
class DataSender:
    """One connection to a decode worker's data port."""

    def __init__(self, addr: str, secret: bytes) -> None:
        self.addr = addr
        self.key = data_key(secret)
        self.sock = socket.create_connection(parse_addr(addr), timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.nonce = os.urandom(NONCE_BYTES)
        self.sock.sendall(MAGIC + self.nonce)
        self.sock.setblocking(False)
        self.authed = False  # the server has not proven the key yet: chunks wait in the queue
        self.challenge = bytearray()
        self.born = time.monotonic()
        self.queue: collections.deque = collections.deque()  # views of owned bytes not yet sent
        self.broken = False
        self.bytes_copied = 0  # what had to be queued because the socket was full
        self.queued_bytes = 0

    @property
    def wants_write(self) -> bool:
        return bool(self.queue) and not self.broken

    def send(self, buffers: list) -> None:
        """Send `buffers` (views of cache memory valid only now) in order, never blocking."""
        if self.broken:
            return
        views = [memoryview(b).cast("B") for b in buffers]
        if self.queue or not self.authed:
            self.flush()  # the socket may have drained since: then this chunk goes without a copy
        if not self.queue and self.authed:
            sent = self._sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if views and sent:
                views[0] = views[0][sent:]
        for v in views:  # the rest must outlive this step's cache contents
            self.queue.append(memoryview(bytes(v)))  # views: sending part of it later copies nothing
            self.bytes_copied += len(v)
            self.queued_bytes += len(v)
        if self.queued_bytes > MAX_QUEUED_BYTES:
            log.warning("KV data connection to %s: %d MB queued, receiver not reading; dropping it",
                        self.addr, self.queued_bytes >> 20)
            self.broken = True
            self.queue.clear()

    def _authenticate(self) -> bool:
        """Read the server's challenge; once it proves the key, queue our proof first. Never blocks."""
        while len(self.challenge) < CHALLENGE_BYTES:
            try:
                data = self.sock.recv(CHALLENGE_BYTES - len(self.challenge))
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                return self._fail(f"handshake failed: {exc}")
            if data == b"":
                return self._fail("closed during the handshake")
            if data is None:
                if time.monotonic() - self.born > AUTH_TIMEOUT_S:
                    return self._fail(f"no handshake answer in {AUTH_TIMEOUT_S:.0f}s")
                return False
            self.challenge += data
        c = bytes(self.challenge)
        server_nonce = c[len(MAGIC): len(MAGIC) + NONCE_BYTES]
        expected = proof(self.key, b"server", self.nonce, server_nonce)
        if c[: len(MAGIC)] != MAGIC or not hmac.compare_digest(c[len(MAGIC) + NONCE_BYTES:], expected):
            return self._fail("the data port did not prove the cluster secret")
        self.queue.appendleft(memoryview(proof(self.key, b"client", self.nonce, server_nonce)))
        self.queued_bytes += PROOF_BYTES
        self.authed = True
        return True

    def _fail(self, why: str) -> bool:
        log.warning("KV data connection to %s: %s", self.addr, why)
        self.broken = True
        self.queue.clear()
        return False

    def flush(self) -> None:
        if not self.authed and not self._authenticate():
            return
        while self.queue and not self.broken:
            batch = [self.queue[i] for i in range(min(IOV_MAX, len(self.queue)))]
            sent = self._sendmsg(batch)
            if not sent:
                return
            self.queued_bytes -= sent
            while self.queue and sent >= len(self.queue[0]):
                sent -= len(self.queue.popleft())
            if sent:
                self.queue[0] = self.queue[0][sent:]

    def _sendmsg(self, views: list) -> int:
        total = 0
        while views:
            try:
                n = self.sock.sendmsg(views[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                return total
            except OSError as exc:
                log.warning("KV data connection to %s failed: %s", self.addr, exc)
                self.broken = True
                self.queue.clear()
                return total
            total += n
            # Advance past what went; stop when the kernel took less than offered.
            offered = sum(len(v) for v in views[:IOV_MAX])
            if n < offered:
                return total
            views = views[IOV_MAX:]
        return total

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.queue.clear()
        self.sock.close()


def frame_buffers(hdr: m.KVChunk, k_parts: list, v_parts: list) -> list:
    header = m.encode(hdr)
    return [_U32.pack(len(header)) + header, *k_parts, *v_parts]


# ---- receiving side --------------------------------------------------------------------------
Placer = Callable[[m.KVChunk], "tuple[list, list] | None"]  # -> (K slot views, V slot views) or None
Landed = Callable[[m.KVChunk, "tuple | None"], None]  # (header, None when placed else (k, v) bytes)


class _Conn:
    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock = sock
        self.peer = peer
        self.born = time.monotonic()
        self.authed = False
        self.buf = bytearray()  # auth / header bytes gathered so far
        self.need = len(MAGIC)  # bytes wanted into buf: the magic is checked first, alone
        self.state = "auth"  # auth (hello) -> proof (the client's answer) -> header <-> payload
        self.server_nonce = os.urandom(NONCE_BYTES)
        self.client_nonce = b""
        self.hdr: m.KVChunk | None = None
        self.targets: list = []  # memoryviews still to fill, in order
        self.placed = False
        self.scratch: tuple[bytearray, bytearray] | None = None


class DataReceiver:
    """The decode worker's data port. `pump(fd)` whenever a socket of `fds()` is readable."""

    def __init__(self, host: str, secret: bytes, placer: Placer, landed: Landed,
                 still_placed: Callable[[m.KVChunk], bool]) -> None:
        self.key = data_key(secret)
        self.placer = placer
        self.landed = landed
        self.still_placed = still_placed
        self.listener = socket.create_server((host, 0), backlog=64)
        self.listener.setblocking(False)
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.conns: dict[int, _Conn] = {}
        self.bytes_direct = 0
        self.rejected = 0
        self._warn = ThrottledWarning(log)  # a connection flood must not become a log flood

    def fds(self) -> list[int]:
        return [self.listener.fileno(), *self.conns]

    @property
    def mid_chunk(self) -> bool:
        return any(c.state == "payload" or c.buf for c in self.conns.values())

    def pump(self, fd: int) -> None:
        if fd == self.listener.fileno():
            self._accept()
            return
        conn = self.conns.get(fd)
        if conn is None:
            return
        try:
            self._read(conn)
        except (ValueError, ConnectionError, OSError) as exc:
            if not isinstance(exc, ConnectionError) or conn.state != "header" or conn.buf:
                self._warn("closing KV data connection from %s: %s", conn.peer, exc)
            self._close(fd)

    def expire(self) -> None:
        """Close connections that did not authenticate in time (bounded: no idle squatters)."""
        now = time.monotonic()
        for fd, conn in list(self.conns.items()):
            if conn.state in ("auth", "proof") and now - conn.born > AUTH_TIMEOUT_S:
                self.rejected += 1
                self._warn("closing KV data connection from %s: no handshake in %.0fs", conn.peer, AUTH_TIMEOUT_S)
                self._close(fd)

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            if len(self.conns) >= MAX_CONNECTIONS:
                self._warn("KV data port: %d connections open, refusing %s", len(self.conns), peer)
                sock.close()
                continue
            sock.setblocking(False)
            self.conns[sock.fileno()] = _Conn(sock, peer)

    def _close(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is not None:
            conn.sock.close()

    def _fill_buf(self, conn: _Conn) -> bool:
        """Read towards conn.need bytes in conn.buf. True once they are all there."""
        while len(conn.buf) < conn.need:
            try:
                data = conn.sock.recv(conn.need - len(conn.buf))
            except (BlockingIOError, InterruptedError):
                return False
            if not data:
                raise ConnectionError("closed")
            conn.buf += data
        return True

    def _read(self, conn: _Conn) -> None:
        while True:
            if conn.state == "payload":
                if not self._read_payload(conn):
                    return
                continue
            if not self._fill_buf(conn):
                return
            if conn.state == "auth":
                if conn.need == len(MAGIC):
                    if bytes(conn.buf) != MAGIC:
                        self.rejected += 1
                        raise ValueError("not a splitserve KV connection (or another protocol version)")
                    conn.need = HELLO_BYTES
                    continue
                conn.client_nonce = bytes(conn.buf[len(MAGIC):])
                answer = MAGIC + conn.server_nonce + proof(self.key, b"server", conn.client_nonce, conn.server_nonce)
                if conn.sock.send(answer) != len(answer):  # 72 bytes into an empty socket buffer
                    raise ConnectionError("could not send the challenge")
                conn.state, conn.buf, conn.need = "proof", bytearray(), PROOF_BYTES
            elif conn.state == "proof":
                expected = proof(self.key, b"client", conn.client_nonce, conn.server_nonce)
                if not hmac.compare_digest(bytes(conn.buf), expected):
                    self.rejected += 1
                    raise ValueError("wrong cluster secret")
                conn.authed = True
                conn.state, conn.buf, conn.need = "header", bytearray(), _U32.size
            elif conn.state == "header" and conn.need == _U32.size:
                size = _U32.unpack(conn.buf)[0]
                if not 0 < size <= MAX_HEADER:
                    raise ValueError(f"header of {size} bytes")
                conn.need += size
            else:
                msg = m.decode_to_worker(bytes(conn.buf[_U32.size:]))
                if not isinstance(msg, m.KVChunk) or msg.shm_name or msg.direct:
                    raise ValueError("expected a KV chunk header")
                self._start_payload(conn, msg)

    def _start_payload(self, conn: _Conn, hdr: m.KVChunk) -> None:
        n = chunk_bytes(hdr)
        conn.hdr, conn.state, conn.buf, conn.need = hdr, "payload", bytearray(), 0
        where = self.placer(hdr)
        if where is not None:
            k_views, v_views = where
            conn.targets = [memoryview(v).cast("B") for v in (*k_views, *v_views)]
            if sum(len(v) for v in conn.targets) != 2 * n:
                raise ValueError("placement does not match the chunk size")
            conn.placed, conn.scratch = True, None
        else:
            conn.scratch = (bytearray(n), bytearray(n))
            conn.targets = [memoryview(conn.scratch[0]), memoryview(conn.scratch[1])]
            conn.placed = False

    def _read_payload(self, conn: _Conn) -> bool:
        """Receive into the targets. True when the chunk is complete."""
        if conn.placed and not self.still_placed(conn.hdr):
            # The transfer was dropped and its blocks may belong to someone else now: the rest of
            # this chunk goes nowhere.
            left = sum(len(v) for v in conn.targets)
            conn.targets = [memoryview(bytearray(left))] if left else []
            conn.placed = False
            conn.hdr = None
        while conn.targets:
            view = conn.targets[0]
            try:
                got = conn.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return False
            if got == 0:
                raise ConnectionError("closed mid-chunk")
            if got == len(view):
                conn.targets.pop(0)
            else:
                conn.targets[0] = view[got:]
        hdr, placed, scratch = conn.hdr, conn.placed, conn.scratch
        conn.state, conn.buf, conn.need, conn.hdr, conn.scratch = "header", bytearray(), _U32.size, None, None
        if hdr is not None:
            if placed:
                self.bytes_direct += 2 * chunk_bytes(hdr)
            self.landed(hdr, None if placed else scratch)
        return True

    def close(self) -> None:
        for fd in list(self.conns):
            self._close(fd)
        self.listener.close()


def data_host(inbox_address: str) -> str:
    """The host a worker's data port binds to: the one its ZeroMQ inbox uses."""
    if inbox_address.startswith("tcp://"):
        host = inbox_address[len("tcp://"):].rpartition(":")[0]
        return host.strip("[]") or "127.0.0.1"
    return "127.0.0.1"

