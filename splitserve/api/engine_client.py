"""The gateway's handle on its engine worker: spawn, stream tokens per request, abort, supervise.

Runs inside the HTTP server's event loop. The worker is a separate OS process (so the model's
threads never fight the server for the GIL) reached over ZeroMQ with typed messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from typing import AsyncIterator

import zmq
import zmq.asyncio

from splitserve.cluster import messages as m
from splitserve.config import EngineConfig
from splitserve.engine.sampling_params import SamplingParams

log = logging.getLogger("splitserve.gateway")


class EngineDeadError(RuntimeError):
    """The worker died with the request in flight."""


class EngineRequestError(ValueError):
    """The worker rejected the request (its message is safe to show to the client)."""


_END = object()


class EngineClient:
    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int], log_level: str = "INFO",
                 restart_on_death: bool = True) -> None:
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.log_level = log_level
        self.restart_on_death = restart_on_death
        self.ctx = zmq.asyncio.Context()
        self._dir = tempfile.mkdtemp(prefix="splitserve-")
        os.chmod(self._dir, 0o700)
        self.outbox_addr = f"ipc://{self._dir}/out.sock"
        self.inbox_addr = f"ipc://{self._dir}/in-0.sock"
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(self.outbox_addr)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind(self.inbox_addr)
        self.process: subprocess.Popen | None = None
        self.ready: m.Ready | None = None
        self.stats: m.Stats | None = None
        self.streams: dict[str, asyncio.Queue] = {}
        self.num_restarts = 0
        self._ready_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.startup_error: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    def _spawn(self) -> None:
        self._ready_event.clear()
        self.ready = None
        cmd = [sys.executable, "-m", "splitserve.cluster.worker", "--id", "worker-0",
               "--inbox", self.inbox_addr, "--outbox", self.outbox_addr,
               "--config", json.dumps(asdict(self.config)), "--eos", json.dumps(sorted(self.eos_token_ids)),
               "--parent-pid", str(os.getpid()), "--log-level", self.log_level]
        self.process = subprocess.Popen(cmd)
        log.info("spawned engine worker pid %d", self.process.pid)

    async def start(self, timeout: float = 600.0) -> m.Ready:
        self._spawn()
        self._tasks.append(asyncio.create_task(self._read_loop()))
        self._tasks.append(asyncio.create_task(self._watch_loop()))
        await self.wait_ready(timeout)
        return self.ready

    async def wait_ready(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"engine worker not ready after {timeout:.0f}s") from None
        if self.ready is None:
            raise RuntimeError(self.startup_error or "engine worker failed to start")

    @property
    def healthy(self) -> bool:
        return self.ready is not None and self.process is not None and self.process.poll() is None

    async def shutdown(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        if self.process and self.process.poll() is None:
            try:
                await self.push.send(m.encode(m.Shutdown()))
            except zmq.ZMQError:
                pass
            for _ in range(50):
                if self.process.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._fail_all(EngineDeadError("server shutting down"))
        self.pull.close(0)
        self.push.close(0)
        self.ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- requests ------------------------------------------------------------------------
    @property
    def num_inflight(self) -> int:
        return len(self.streams)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       seed: int) -> AsyncIterator[m.TokenOut]:
        """Yield the request's tokens; aborts it on the worker if the consumer stops early."""
        if not self.healthy:
            raise EngineDeadError("engine worker is not running")
        if request_id in self.streams:
            raise EngineRequestError(f"duplicate request id {request_id!r}")
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = queue
        finished = False
        try:
            await self.push.send(m.encode(m.AddRequest(request_id, prompt_token_ids, params, seed)))
            while True:
                item = await queue.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, Exception):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self.streams.pop(request_id, None)
            if not finished and self.healthy:
                # Consumer left (client disconnect, stop string, error): free the worker's blocks.
                await self.abort([request_id])

    async def finish_stream(self, request_id: str, stopped: bool = True) -> None:
        """End a stream from the gateway side (a stop string matched): free it on the worker
        and let its consumer return normally."""
        q = self.streams.get(request_id)
        if q is not None:
            q.put_nowait(_END)
        await self.abort([request_id], stopped=stopped)

    async def abort(self, request_ids: list[str], stopped: bool = False) -> None:
        if request_ids and self.healthy:
            await self.push.send(m.encode(m.AbortRequests(list(request_ids), stopped)))

    # ---- background loops ----------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            data = await self.pull.recv()
            try:
                msg = m.decode_from_worker(data)
            except Exception as exc:
                log.warning("dropped an undecodable worker message: %s", exc)
                continue
            if isinstance(msg, m.Outputs):
                for item in msg.items:
                    q = self.streams.get(item.request_id)
                    if q is not None:
                        q.put_nowait(item)
            elif isinstance(msg, m.Stats):
                self.stats = msg
            elif isinstance(msg, m.RequestError):
                if not msg.request_id:
                    self.startup_error = msg.message
                    continue
                q = self.streams.get(msg.request_id)
                if q is not None:
                    q.put_nowait(EngineRequestError(msg.message))
            elif isinstance(msg, m.Ready):
                self.ready = msg
                self._ready_event.set()
                log.info("engine worker ready: %d KV blocks, max_model_len %d, loaded in %.2fs",
                         msg.num_blocks, msg.max_model_len, msg.load_seconds)

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self._closing or self.process is None or self.process.poll() is None:
                continue
            code = self.process.returncode
            was_ready = self.ready is not None
            self.ready = None
            self._fail_all(EngineDeadError(f"engine worker exited with code {code}"))
            if not was_ready:
                self.startup_error = self.startup_error or f"engine worker exited with code {code} during startup"
                self._ready_event.set()
                return
            log.error("engine worker died (exit code %s)", code)
            if not self.restart_on_death:
                return
            self.num_restarts += 1
            self._spawn()

    def _fail_all(self, exc: Exception) -> None:
        for q in list(self.streams.values()):
            q.put_nowait(exc)
