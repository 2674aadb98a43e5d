"""Cluster security without a server: CURVE admission, frame limits, the secret never on the wire,
weak secrets, join refusal, the gateway's attempt bookkeeping, heartbeat timing, throttled logs."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import select
import socket
import subprocess
import threading
import time

import msgspec
import pytest
import zmq

from splitserve.cluster import liveness, security
from splitserve.cluster import messages as m
from splitserve.cluster.gateway import Cluster, EngineRequestError
from splitserve.cluster.launchers import WorkerState
from splitserve.cluster.logthrottle import ThrottledWarning
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv import tcp

SECRET = b"0123456789abcdef0123456789abcdef"
OTHER = b"fedcba9876543210fedcba9876543210"


@pytest.fixture
def ctx():
    context = zmq.Context()
    auth = security.start_authenticator(context, security.derive_keys(SECRET))
    yield context
    auth.stop()
    context.destroy(linger=0)


def _server(ctx, max_bytes=1 << 20):
    sock = security.secure_server(ctx.socket(zmq.PULL), security.derive_keys(SECRET), max_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 1500)
    sock.bind("tcp://127.0.0.1:0")
    return sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def _client(ctx, addr, keys=None):
    sock = ctx.socket(zmq.PUSH)
    if keys is not None:
        security.secure_client(sock, keys)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    return sock


def _drain(sock) -> list[bytes]:
    got = []
    try:
        while True:
            got.append(sock.recv())
    except zmq.Again:
        return got


# ---- secrets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("weak", ["x", "s3cret", "a" * 64, "abababababababababababababababab", "0123456789abcde"])
def test_weak_secrets_are_refused_with_a_clear_error(weak):
    with pytest.raises(security.WeakSecretError, match="at least 32 characters"):
        security.check_secret_strength(weak)
    with pytest.raises(security.WeakSecretError):
        Cluster([], frozenset(), secret=weak)


def test_a_generated_secret_is_accepted_and_keys_are_deterministic():
    s = secrets.token_hex(16)
    assert security.check_secret_strength(s) == s.encode()
    a, b = security.derive_keys(s.encode()), security.derive_keys(s.encode())
    assert a == b and a != security.derive_keys(OTHER)
    assert len({a.server_public, a.client_public, a.data_key}) == 3
    assert s not in repr(a)


def test_a_joining_worker_with_a_weak_secret_exits_with_an_error(caplog):
    from splitserve.cluster.worker import run_worker

    with caplog.at_level(logging.ERROR):
        assert run_worker("w", "decode", {}, [], "tcp://127.0.0.1:0", "tcp://127.0.0.1:1", "c", b"x", None) == 2
    assert "too weak" in caplog.text


# ---- CURVE admission and limits --------------------------------------------------------------
def test_only_holders_of_the_secret_get_a_message_through(ctx):
    server, addr = _server(ctx)
    outsider = ctx.socket(zmq.PUSH)  # knows the server's public key but not the cluster's client key
    public, secret = zmq.curve_keypair()
    outsider.curve_serverkey = security.derive_keys(SECRET).server_public
    outsider.curve_publickey, outsider.curve_secretkey = public, secret
    outsider.setsockopt(zmq.LINGER, 0)
    outsider.connect(addr)
    clients = {b"no-curve": _client(ctx, addr), b"wrong-secret": _client(ctx, addr, security.derive_keys(OTHER)),
               b"own-key": outsider, b"member": _client(ctx, addr, security.derive_keys(SECRET))}
    for name, sock in clients.items():
        sock.send(name, zmq.NOBLOCK)
    assert _drain(server) == [b"member"]
    for sock in (server, *clients.values()):
        sock.close(0)


def test_an_oversized_frame_is_dropped_and_the_connection_recovers(ctx):
    server, addr = _server(ctx, max_bytes=1 << 16)
    member = _client(ctx, addr, security.derive_keys(SECRET))
    member.send(b"before")
    assert server.recv() == b"before"
    member.send(b"x" * (1 << 20))  # over the limit: the connection is cut, nothing allocated for it
    time.sleep(0.5)
    member.send(b"after")
    assert _drain(server) == [b"after"]
    member.close(0)
    server.close(0)


class _Tap:
    """A TCP forwarder that records every byte in both directions."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        a, _ = self.listener.accept()
        b = socket.create_connection(self.target)
        peers = {a: b, b: a}
        while not self.done.is_set():
            readable, _, _ = select.select(list(peers), [], [], 0.05)
            for s in readable:
                data = s.recv(1 << 16)
                if not data:
                    self.done.set()
                    break
                self.seen += data
                peers[s].sendall(data)
        a.close()
        b.close()


def test_cluster_traffic_is_encrypted_and_never_carries_the_secret(ctx):
    server, addr = _server(ctx)
    tap = _Tap(tcp.parse_addr(addr[len("tcp://"):]))
    member = _client(ctx, f"tcp://127.0.0.1:{tap.port}", security.derive_keys(SECRET))
    prompt = b"a user's private prompt " * 10
    member.send(prompt)
    assert server.recv() == prompt
    keys = security.derive_keys(SECRET)
    for needle in (SECRET, b"private prompt", zmq.utils.z85.decode(keys.client_secret),
                   zmq.utils.z85.decode(keys.server_secret), keys.data_key):
        assert needle not in tap.seen
    tap.done.set()
    member.close(0)
    server.close(0)


# ---- the TCP KV data channel -----------------------------------------------------------------
def _pump(rx, until, seconds=3.0, sender=None) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not until():
        if sender is not None:
            sender.flush()
        readable, _, _ = select.select(rx.fds(), [], [], 0.02)
        for fd in readable:
            rx.pump(fd)


def _receiver(secret: bytes, landed: list):
    return tcp.DataReceiver("127.0.0.1", secret, lambda hdr: None, lambda hdr, kv: landed.append((hdr, kv)),
                            lambda hdr: False)


def _chunk() -> list:
    hdr = m.KVChunk("r", 0, 0, 2, 1, 4, "float32")
    return tcp.frame_buffers(hdr, [bytes(range(32))], [bytes(range(32, 64))])


def test_data_channel_proves_the_key_both_ways_and_never_sends_the_secret():
    landed: list = []
    rx = _receiver(SECRET, landed)
    tap = _Tap(tcp.parse_addr(rx.address))
    tx = tcp.DataSender(f"127.0.0.1:{tap.port}", SECRET)
    tx.send(_chunk())  # queued until the data port proved the key
    _pump(rx, lambda: landed, sender=tx)
    got = [(h.request_id, bytes(k), bytes(v)) for h, (k, v) in landed]
    assert got == [("r", bytes(range(32)), bytes(range(32, 64)))]
    assert tx.authed and not tx.broken and rx.rejected == 0
    assert SECRET not in tap.seen and tcp.data_key(SECRET) not in tap.seen
    tx.close()
    rx.close()


def test_data_channel_refuses_a_client_with_another_secret_and_a_client_refuses_such_a_server():
    landed: list = []
    rx = _receiver(SECRET, landed)
    tx = tcp.DataSender(rx.address, OTHER)
    tx.send(_chunk())
    _pump(rx, lambda: tx.broken or rx.rejected, sender=tx)
    assert tx.broken  # the server's proof did not match: nothing of ours was sent
    assert not landed
    tx.close()
    # A client that answers without checking the server (hand-made) is refused by the server.
    raw = socket.create_connection(tcp.parse_addr(rx.address))
    nonce = os.urandom(tcp.NONCE_BYTES)
    raw.sendall(tcp.MAGIC + nonce)
    _pump(rx, lambda: False, seconds=0.2)
    challenge = raw.recv(tcp.CHALLENGE_BYTES, socket.MSG_WAITALL)
    raw.sendall(tcp.proof(tcp.data_key(OTHER), b"client", nonce, challenge[len(tcp.MAGIC):][:tcp.NONCE_BYTES]))
    raw.sendall(b"".join(bytes(b) for b in _chunk()))
    _pump(rx, lambda: rx.rejected)
    assert rx.rejected == 1 and not rx.conns and not landed
    raw.close()
    rx.close()


def test_a_replayed_proof_is_refused():
    """The server's fresh nonce makes a recorded client proof worthless."""
    landed: list = []
    rx = _receiver(SECRET, landed)
    tap = _Tap(tcp.parse_addr(rx.address))
    tx = tcp.DataSender(f"127.0.0.1:{tap.port}", SECRET)
    tx.send(_chunk())
    _pump(rx, lambda: landed, sender=tx)
    recorded = bytes(tap.seen[: tcp.HELLO_BYTES]), bytes(tap.seen[tcp.HELLO_BYTES + tcp.CHALLENGE_BYTES:])
    tx.close()
    raw = socket.create_connection(tcp.parse_addr(rx.address))
    raw.sendall(recorded[0])
    _pump(rx, lambda: False, seconds=0.2)
    raw.recv(tcp.CHALLENGE_BYTES, socket.MSG_WAITALL)
    raw.sendall(recorded[1])
    _pump(rx, lambda: rx.rejected)
    assert rx.rejected == 1 and len(landed) == 1
    raw.close()
    rx.close()


# ---- the gateway: joins and bookkeeping ------------------------------------------------------
def _ready(worker_id: str, pid: int, address: str, role: str = "decode") -> m.Ready:
    return m.Ready(worker_id, pid, role, address, 64, 16, 1024, 100, 0.0, "host")


def _inbox(cluster: Cluster):
    sock = security.secure_server(cluster.ctx.socket(zmq.PULL), cluster.keys, 1 << 20)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    return sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()


async def _recv(sock, timeout=2.0):
    return m.decode_to_worker(await asyncio.wait_for(sock.recv(), timeout))


def test_a_join_under_a_live_id_is_refused():
    async def scenario():
        cluster = Cluster([], frozenset(), secret=SECRET.decode())
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            real, real_addr = _inbox(cluster)
            fake, fake_addr = _inbox(cluster)
            cluster._on_ready(_ready("decode-x", 111, real_addr))
            assert isinstance(await _recv(real), m.Welcome)
            cluster._on_ready(_ready("decode-x", 222, fake_addr))  # takeover attempt
            assert cluster.workers["decode-x"].ready.pid == 111
            # The id of a spawned worker belongs to its process, even while it starts.
            cluster.workers["decode-x"].state = "dead"
            from splitserve.cluster.supervision import WorkerHandle

            cluster.workers["decode-0"] = WorkerHandle("decode-0", "decode", None, "", launch=sleeper)
            cluster._on_ready(_ready("decode-0", 333, fake_addr))
            assert cluster.workers["decode-0"].ready is None
            cluster._on_ready(_ready("decode-0", sleeper.pid, fake_addr, role="prefill"))
            assert cluster.workers["decode-0"].ready is None
            cluster._on_ready(_ready("decode-0", sleeper.pid, real_addr))
            assert cluster.workers["decode-0"].ready.pid == sleeper.pid
            # A joined id whose holder died is free again.
            cluster._on_ready(_ready("decode-x", 444, real_addr))
            assert cluster.workers["decode-x"].ready.pid == 444
            await asyncio.sleep(0.3)
            assert await fake.poll(0) == 0  # the impostor never heard from the gateway
            real.close(0)
            fake.close(0)
        finally:
            sleeper.kill()
            sleeper.wait()
            cluster._closing = True
            cluster._auth.stop()
            cluster.ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_a_request_that_cannot_be_encoded_leaves_no_attempt_behind():
    async def scenario():
        cluster = Cluster([], frozenset(), secret=SECRET.decode())
        inbox, addr = _inbox(cluster)
        cluster._on_ready(_ready("decode-x", 1, addr))
        params = SamplingParams(max_tokens=4)
        for i in range(50):
            with pytest.raises(EngineRequestError, match="cannot be encoded"):
                async for _ in cluster.generate(f"r{i}", [1, 2, 3], params, seed=2**64):
                    pass
        assert cluster.attempts == {} and cluster.current == {}
        # A send that fails for want of a worker is forgotten too.
        cluster.workers["decode-x"].state = WorkerState.STARTING
        cluster.router.set_health("decode-x", True)
        with pytest.raises(Exception):
            await cluster._dispatch("s@1", [1, 2], [], params, 0, True, asyncio.Queue(), "s")
        assert "s@1" not in cluster.attempts
        inbox.close(0)
        cluster.workers["decode-x"].state = WorkerState.READY
        await cluster.shutdown()

    asyncio.run(scenario())


def test_msgspec_cannot_encode_a_seed_past_64_bits():
    # The failure the test above relies on.
    with pytest.raises((OverflowError, msgspec.EncodeError)):
        m.encode(m.AddRequest("r", [1], SamplingParams(), 2**64))


# ---- liveness and logs -----------------------------------------------------------------------
def test_silence_clock_judges_only_while_the_loop_keeps_time():
    clock = liveness.SilenceClock(timeout_s=5.0, now=100.0)
    assert clock.tick(100.1)
    assert clock.silent_for(last_seen=94.0, now=100.1) > 0 and clock.silent_for(99.0, 100.1) < 0
    assert not clock.tick(108.0)  # the loop stalled 8 s: every worker only looks silent
    assert not clock.tick(108.5)
    assert clock.tick(109.1)


def test_a_flood_of_bad_frames_costs_a_few_log_lines(caplog):
    warn = ThrottledWarning(logging.getLogger("test.flood"), interval_s=60)
    with caplog.at_level(logging.WARNING, logger="test.flood"):
        for i in range(100_000):
            warn("dropped frame %d", i)
    assert warn.total == 100_000 and len(caplog.records) == 1


def test_a_connection_flood_on_the_data_port_costs_a_few_log_lines(caplog):
    rx = _receiver(SECRET, [])
    with caplog.at_level(logging.WARNING, logger="splitserve.kv.tcp"):
        for _ in range(200):
            with socket.create_connection(tcp.parse_addr(rx.address)) as junk:
                junk.sendall(b"GET / HTTP/1.1\r\n\r\n")
                _pump(rx, lambda: False, seconds=0.01)
        _pump(rx, lambda: rx.rejected >= 200)
    assert rx.rejected == 200 and not rx.conns
    assert len(caplog.records) <= 2
    rx.close()
