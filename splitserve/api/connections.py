"""Client connections are bounded: a connection cap, and header, body and keep-alive timeouts.

uvicorn closes a kept-alive connection after `timeout_keep_alive`, but a connection that sends
nothing, or its request headers or body a byte at a time, stays open forever, and enough of them
(20,000 was enough) exhaust the process's file descriptors so no real request gets in. Each
connection here is in one phase; a sweeper closes those that stay too long in a phase that
waits on the client, and at the cap a new connection displaces the oldest one that waits on the
client rather than being refused. A request being answered (a stream may last minutes) is never
timed out.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("splitserve.connections")

SWEEP_INTERVAL_S = 0.5
_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 2048  # open client connections; more displace the idle ones
    header_timeout_s: float = 15.0  # from connect (or the previous response) to complete request headers
    body_timeout_s: float = 60.0  # from the headers to the complete body
    keep_alive_s: int = 5  # uvicorn's idle keep-alive timeout


class Phase(enum.Enum):
    SILENT = "silent"  # nothing received since connect or the previous response
    HEADERS = "headers"  # part of a request's headers received
    BODY = "body"  # headers done, body still arriving
    ANSWERING = "answering"  # the request is complete; the app is answering it


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft descriptor limit toward `wanted` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class ConnectionRegistry:
    """The open connections in arrival order, and the sweeper that times them out."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed_idle = 0  # counters, for the log and the tests
        self.closed_slow = 0
        self.refused = 0

    def admit(self, conn: "GuardedProtocol") -> bool:
        if len(self.open) >= self.limits.max_connections and not self._displace_one():
            self.refused += 1
            return False
        self.open[conn] = None
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(SWEEP_INTERVAL_S, self._sweep, conn.loop)
        return True

    def forget(self, conn: "GuardedProtocol") -> None:
        self.open.pop(conn, None)

    def _displace_one(self) -> bool:
        """Close the oldest connection that has sent nothing; failing that, the oldest one that
        is sending headers slowly. A request with complete headers is never displaced."""
        for phase in (Phase.SILENT, Phase.HEADERS):
            for conn in self.open:
                if conn.phase() is phase:
                    self.closed_idle += 1
                    self._close(conn)
                    return True
        return False

    def _close(self, conn: "GuardedProtocol") -> None:
        self.forget(conn)
        conn.transport.close()

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        limits = {Phase.SILENT: self.limits.header_timeout_s, Phase.HEADERS: self.limits.header_timeout_s,
                  Phase.BODY: self.limits.body_timeout_s}
        for conn in list(self.open):
            phase = conn.phase()
            if phase in limits and now - conn.phase_since > limits[phase]:
                self.closed_slow += 1
                self._close(conn)
        self._sweeper = loop.call_later(SWEEP_INTERVAL_S, self._sweep, loop) if self.open else None


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, registered with a ConnectionRegistry (see `guarded_protocol`)."""

    registry: ConnectionRegistry

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.phase_since = time.monotonic()
        self._cycle_seen = None
        self._bytes_in_phase = 0
        super().connection_made(transport)
        if not self.registry.admit(self):
            transport.write(_REFUSED)
            transport.close()

    def connection_lost(self, exc) -> None:
        self.registry.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._bytes_in_phase += len(data)
        super().data_received(data)
        self._note_new_request()

    def on_response_complete(self) -> None:
        self.phase_since = time.monotonic()
        self._bytes_in_phase = 0
        super().on_response_complete()
        self._note_new_request()  # a pipelined request may have started inside

    def _note_new_request(self) -> None:
        if self.cycle is not None and self.cycle is not self._cycle_seen:  # its headers are complete
            self._cycle_seen = self.cycle
            self.phase_since = time.monotonic()

    def phase(self) -> Phase:
        cycle = self.cycle
        if cycle is None or cycle is not self._cycle_seen or cycle.response_complete:
            return Phase.HEADERS if self._bytes_in_phase else Phase.SILENT
        return Phase.BODY if cycle.more_body else Phase.ANSWERING


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with its own registry (one per server)."""
    return type("GuardedH11Protocol", (GuardedProtocol,), {"registry": ConnectionRegistry(limits)})
