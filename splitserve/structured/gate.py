"""The engine's side of structured outputs: park requests while their grammar compiles, build each
step's token bitmask.

A request with a grammar is admitted to the scheduler (or to the KV sender, on a prefill worker)
only once its matcher is READY, so a slow compile never stalls another request's step. A decode
worker's request is reserved at once (the KV is already on its way) and its grammar compiles
while the prefill runs; sampling waits for it only if the compile outlasts the whole prefill.
"""

from __future__ import annotations

import logging
from typing import Callable

from splitserve.engine.request import Request
from splitserve.engine.scheduler import QueueFull
from splitserve.structured.matcher import GrammarBackend, GrammarStatus

log = logging.getLogger(__name__)

MAX_DECODE_WAIT_S = 30.0


class GrammarGate:
    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._args = (tokenizer_path, vocab_size, eos_token_ids)
        self._backend: GrammarBackend | None = None
        self.waiting: dict[str, tuple[Request, Callable[[], None]]] = {}  # request id -> (request, admit)
        # (request id, message, queue_full) for the worker to report: a failed compile is the
        # client's error; a queue that filled up while the grammar compiled is an overload (503)
        self.failed: list[tuple[str, str, bool]] = []

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = GrammarBackend(*self._args)
        return self._backend

    def attach(self, req: Request) -> None:
        """Start compiling the request's grammar (a cache hit is READY at once)."""
        spec = req.sampling_params.grammar
        if spec is not None:
            req.grammar = self.backend.start(spec)

    def admit_when_ready(self, req: Request, admit: Callable[[], None]) -> None:
        state = req.grammar
        status = state.poll() if state is not None else GrammarStatus.READY
        if status is GrammarStatus.READY:
            admit()
        elif status is GrammarStatus.FAILED:
            raise ValueError(state.error)
        else:
            self.waiting[req.request_id] = (req, admit)

    def admit_ready(self) -> None:
        """Once per step: admit the requests whose grammar finished compiling."""
        for rid, (req, admit) in list(self.waiting.items()):
            status = req.grammar.poll()
            if status is GrammarStatus.COMPILING:
                continue
            del self.waiting[rid]
            if status is GrammarStatus.READY:
                try:
                    admit()
                except ValueError as exc:  # e.g. the queue filled up while it compiled
                    self.failed.append((rid, str(exc), isinstance(exc, QueueFull)))
            else:
                self.failed.append((rid, req.grammar.error, False))

    def drop(self, request_id: str) -> bool:
        return self.waiting.pop(request_id, None) is not None

    def take_failures(self) -> list[tuple[str, str, bool]]:
        failed, self.failed = self.failed, []
        return failed

    def constrain(self, requests: list[Request]):
        """The step's (grammar rows, token bitmask) for the sampler, or None when no row has a grammar."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return None
        states = []
        for i in rows:
            req = requests[i]
            state = req.grammar
            if state.poll() is GrammarStatus.COMPILING:  # a decode worker whose compile outlasted the prefill
                log.warning("%s: waiting for its grammar to compile", req.request_id)
                state.wait(MAX_DECODE_WAIT_S)
            if state.status is GrammarStatus.READY:
                state.sync(req.token_ids, req.num_prompt_tokens)
            states.append(state)
        return rows, self.backend.fill_bitmask(states)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
