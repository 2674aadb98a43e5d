"""The live gateway's queue in front of prefill: `DecodeAdmission` (the policy the simulator runs
too) plus the waiting clients' futures. `place_now` places and accounts a request synchronously
(Router.place + Router.on_dispatch), so each release sees the previous one's load."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable

from splitserve.cluster.admission import AdmissionConfig, DecodeAdmission, Verdict
from splitserve.cluster.router import NoWorkerAvailable, Placement, WorkerView


class GatewayQueueFull(RuntimeError):
    """The gateway queue is at its bound (the gateway answers 503)."""


class GatewayQueue:
    def __init__(self, config: AdmissionConfig, views: Iterable[WorkerView],
                 place_now: Callable[[list[int]], Placement]) -> None:
        self.admission = DecodeAdmission(config)
        self._views = views  # the router's live WorkerViews
        self._place_now = place_now
        self._waiters: dict[str, tuple[asyncio.Future, list[int]]] = {}

    async def admit(self, request_id: str, tokens: list[int], max_tokens: int) -> Placement:
        """Place the request once a decode worker can take it; wait in FIFO order until then."""
        verdict = self.admission.offer(request_id, len(tokens), max_tokens, self._views, time.monotonic())
        if verdict is Verdict.ADMIT:
            return self._place_now(tokens)
        if verdict is Verdict.REJECTED:
            raise GatewayQueueFull("the gateway queue is full (the decode pool is busy); retry later")
        fut = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = (fut, tokens)
        try:
            return await fut
        finally:
            if self._waiters.pop(request_id, None) is not None:  # left the queue unserved (client gone)
                self.admission.cancel(request_id)

    def release(self) -> None:
        """After a load report: place queued requests, oldest first, while the next one fits."""
        while self._waiters and (rid := self.admission.pop_ready(self._views)) is not None:
            fut, tokens = self._waiters.pop(rid)
            if fut.done():
                continue
            try:
                fut.set_result(self._place_now(tokens))
            except NoWorkerAvailable as exc:
                fut.set_exception(exc)

    def info(self) -> dict:
        q = self.admission.stats(time.monotonic())
        return {"length": q.length, "oldest_wait_s": round(q.oldest_wait_s, 3),
                "max_length": self.admission.config.max_queue, "admitted": q.admitted, "queued": q.queued,
                "rejected": q.rejected}
