"""Cluster credentials: everything a process proves or checks is derived from the one cluster secret.

The secret itself never travels. From it (scrypt, then HKDF-SHA256 expansion, RFC 5869) every
process derives the same three keys:

  * a CURVE server key pair: every socket that binds (the gateway's collector, a worker's inbox)
    is a CURVE server with it;
  * a CURVE client key pair: every socket that connects presents it; a ZAP handler on each
    process's context admits only this client key, so a peer without the secret cannot finish
    the handshake and no byte of its traffic reaches the application;
  * an HMAC key for the raw TCP KV data channel's challenge-response (kv/tcp.py).

CURVE (ZeroMQ's CurveZMQ: Curve25519 key agreement, XSalsa20-Poly1305 per message) makes every
cluster message authenticated and encrypted; scrypt makes each guess of a captured handshake's
secret cost ~16 MiB and tens of milliseconds. Every socket also gets a maximum message size, so
no peer, authenticated or not, makes a process allocate more than that for one frame.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from dataclasses import dataclass

import zmq
import zmq.auth.thread

log = logging.getLogger("splitserve.security")

MIN_SECRET_CHARS = 32
MIN_DISTINCT_CHARS = 8
ZAP_DOMAIN = "splitserve"
MAX_CONTROL_MSG_BYTES = 16 << 20  # gateway collector: Outputs, Stats (with prefix-cache events), Ready
MAX_WORKER_MSG_BYTES = 1 << 30  # a worker inbox: requests (token ids) and one layer's K or V for a chunk
CONTROL_RCVHWM = 10_000  # messages queued per socket before the sender waits
_SALT = b"splitserve-cluster-v1"


class WeakSecretError(ValueError):
    """The cluster secret is too short or too repetitive to protect the cluster."""


def check_secret_strength(secret: str | bytes) -> bytes:
    """The secret as bytes, or WeakSecretError saying what a usable one looks like."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_CHARS or len(set(raw)) < MIN_DISTINCT_CHARS:
        raise WeakSecretError(
            f"the cluster secret is too weak ({len(raw)} characters, {len(set(raw))} distinct): use at least "
            f"{MIN_SECRET_CHARS} characters with at least {MIN_DISTINCT_CHARS} distinct ones, e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_hex(16))'`")
    return raw


def _hkdf_expand(prk: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-Expand (RFC 5869) with SHA-256."""
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


@dataclass(frozen=True)
class ClusterKeys:
    server_public: bytes  # z85, 40 characters
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    data_key: bytes  # raw 32 bytes: HMAC key of the TCP KV data channel

    def __repr__(self) -> str:  # never print key material in a traceback or log
        return "ClusterKeys(<redacted>)"


def _curve_pair(seed: bytes) -> tuple[bytes, bytes]:
    secret = zmq.utils.z85.encode(seed)
    return zmq.curve_public(secret), secret


@functools.lru_cache(maxsize=4)
def derive_keys(secret: bytes) -> ClusterKeys:
    prk = hashlib.scrypt(secret, salt=_SALT, n=1 << 14, r=8, p=1, dklen=32)
    server_public, server_secret = _curve_pair(_hkdf_expand(prk, b"curve server"))
    client_public, client_secret = _curve_pair(_hkdf_expand(prk, b"curve client"))
    return ClusterKeys(server_public, server_secret, client_public, client_secret, _hkdf_expand(prk, b"kv data"))


class _OnlyClusterClients:
    """ZAP credentials provider: admits the one client key derived from the secret."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(bytes(key), self.client_public)


def start_authenticator(ctx: zmq.Context, keys: ClusterKeys) -> zmq.auth.thread.ThreadAuthenticator:
    """Run the ZAP handler for `ctx` (an asyncio context works too: a sync shadow serves the thread).
    Stop it with `.stop()` before terminating the context."""
    sync_ctx = ctx if type(ctx) is zmq.Context else zmq.Context.shadow(ctx.underlying)
    auth = zmq.auth.thread.ThreadAuthenticator(sync_ctx, log=logging.getLogger("splitserve.zap"))
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_OnlyClusterClients(keys.client_public))
    return auth


def _limits(sock: zmq.Socket, max_msg_bytes: int) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)


def secure_server(sock: zmq.Socket, keys: ClusterKeys, max_msg_bytes: int, rcvhwm: int | None = None) -> zmq.Socket:
    """Make a binding socket a CURVE server that only cluster clients can talk to. Call before bind."""
    _limits(sock, max_msg_bytes)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler answering: refuse, never admit
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    return sock


def secure_client(sock: zmq.Socket, keys: ClusterKeys, max_msg_bytes: int = MAX_CONTROL_MSG_BYTES) -> zmq.Socket:
    """Make a connecting socket a CURVE client with the cluster's client key. Call before connect."""
    _limits(sock, max_msg_bytes)
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret
    return sock


def join_refusal(ready, spawned_pid: int | None, role: str | None, state: str | None) -> str | None:
    """Why a Ready must not take over worker id `ready.worker_id`, or None to admit it.

    `spawned_pid`, `role`, `state`: what the gateway knows of the id now (None: unknown id). An id
    the gateway spawned belongs to that process alone; a joined id stays its holder's while that
    one is alive (ready, or silent and not yet given up on)."""
    if spawned_pid is not None:
        if ready.pid != spawned_pid:
            return f"the id belongs to the worker process this gateway spawned (pid {spawned_pid})"
        if ready.role != role:
            return f"the id is a {role} worker, not {ready.role}"
        return None
    if state in ("ready", "silent"):
        return "a live worker already holds this id"
    return None
