"""Liveness: every worker beats, the gateway notices silence, an orphaned worker cleans up and exits.

Worker side, a thread with its own socket (ZeroMQ sockets are not thread-safe) sends a Heartbeat
every HEARTBEAT_INTERVAL_S, so a long engine step does not look like silence while a stopped or
frozen process does. Until the gateway welcomes the worker the thread re-sends its Ready instead,
so a worker whose first announcement was refused or lost keeps asking. The same thread watches
the parent process: a spawned worker whose gateway is gone removes its shared-memory segments
and exits, even when its main thread is stuck in a long computation.

Gateway side, `SilenceClock` says which workers have been quiet too long, and stays blind for a
moment after its own event loop was blocked: then every worker only looks silent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import zmq

from splitserve.cluster import messages as m
from splitserve.cluster import security

log = logging.getLogger("splitserve.liveness")

HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 5.0  # this long without a message from a worker: out of routing, its requests re-placed
SILENT_GIVE_UP_S = 60.0  # this long silent: a spawned worker is killed (and restarted), a joined one dropped
LOOP_LAG_S = 1.0  # the gateway's loop stalled this long: judge nobody until messages caught up


class HeartbeatThread(threading.Thread):
    def __init__(self, ctx: zmq.Context, keys: security.ClusterKeys, gateway_addr: str, ready: m.Ready,
                 parent_pid: int | None, on_orphaned: Callable[[], None]) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.ctx, self.keys, self.gateway_addr, self.ready = ctx, keys, gateway_addr, ready
        self.parent_pid = parent_pid
        self.on_orphaned = on_orphaned
        self.welcomed = threading.Event()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run(self) -> None:
        sock = security.secure_client(self.ctx.socket(zmq.PUSH), self.keys)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.gateway_addr)
        beat = m.encode(m.Heartbeat(self.ready.worker_id, self.ready.pid))
        announce = m.encode(self.ready)
        try:
            while not self._stop_event.wait(HEARTBEAT_INTERVAL_S):
                if self.parent_gone():
                    log.warning("gateway (pid %d) gone; removing shared memory and exiting", self.parent_pid)
                    self.on_orphaned()
                    return
                try:
                    sock.send(beat if self.welcomed.is_set() else announce, zmq.NOBLOCK)
                except zmq.Again:  # the gateway is not reading: a beat later is as good
                    pass
        finally:
            sock.close(0)


class SilenceClock:
    """Which workers have been silent too long, judged only while the gateway's loop is on time."""

    def __init__(self, timeout_s: float = HEARTBEAT_TIMEOUT_S, now: float | None = None) -> None:
        self.timeout_s = timeout_s
        self._last_tick = time.monotonic() if now is None else now
        self._blind_until = 0.0

    def tick(self, now: float) -> bool:
        """Call on every supervision round. False while messages queued during a stall are read."""
        if now - self._last_tick > LOOP_LAG_S:
            self._blind_until = now + LOOP_LAG_S
        self._last_tick = now
        return now >= self._blind_until

    def silent_for(self, last_seen: float, now: float) -> float:
        """Seconds past the timeout (<= 0: not silent)."""
        return now - last_seen - self.timeout_s
