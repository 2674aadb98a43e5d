"""The engine's side of structured outputs: park requests while their grammar compiles, build each
step's token bitmask.

A request with a grammar joins the scheduler (or the KV sender, on a prefill worker) only once its
matcher is READY, so a slow compile never stalls another request's step. A decode worker's request
is reserved at once (the KV is already on its way) and its grammar compiles while the prefill runs;
if its KV is all here first, it keeps its blocks (WAITING_FOR_KV) and is parked here, admitted by
`admit_ready()` when the compile ends (`DecodeAdmission`). A parked request whose compile fails or
outlasts `MAX_COMPILE_S` is reported with a clear error; the step loop never waits for a compile.

Each step's mask is computed on the backend's mask thread while the forward pass runs (`StepMask`):
it needs only the matchers' state after the previous step's tokens.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch

from splitserve.engine.request import Request
from splitserve.engine.scheduler import QueueFull
from splitserve.structured.matcher import GrammarBackend, GrammarStatus

log = logging.getLogger(__name__)

# A grammar still compiling this long after its request was parked fails the request (llguidance
# compiles real-world schemas in ~1 ms; this is a runaway grammar, not a slow one).
MAX_COMPILE_S = 30.0


@dataclass(slots=True)
class _Parked:
    request: Request
    admit: Callable[[], None]
    on_fail: Callable[[], None] | None  # gives back what the request holds (a decode worker's blocks)
    deadline: float


class StepMask:
    """One step's grammar constraint: the sample rows under a grammar and their token bitmask,
    computed on the mask thread (or already computed) while the forward pass runs."""

    __slots__ = ("rows", "_future", "_bitmask")

    def __init__(self, rows: list[int], future: Future | None = None, bitmask: torch.Tensor | None = None) -> None:
        self.rows = rows
        self._future = future
        self._bitmask = bitmask

    def result(self) -> tuple[list[int], torch.Tensor]:
        if self._bitmask is None:
            self._bitmask = self._future.result()
        return self.rows, self._bitmask

    def settle(self) -> None:
        """The step failed: wait for the mask thread to leave the matchers, ignoring its outcome."""
        if self._future is not None:
            try:
                self._future.result()
            except Exception:
                pass


class GrammarGate:
    # Compute each step's mask on the mask thread during the forward pass. Off: on the engine's
    # thread before sampling (the general path the overlapped one is tested against).
    overlap = True

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: frozenset[int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._args = (tokenizer_path, vocab_size, eos_token_ids)
        self._backend: GrammarBackend | None = None
        self.clock = clock
        self.waiting: dict[str, _Parked] = {}  # request id -> parked until its grammar is ready
        # (request id, message, queue_full) for the worker to report: a failed or runaway compile
        # is the client's error; a queue that filled up while the grammar compiled is an overload (503)
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

    def admit_when_ready(self, req: Request, admit: Callable[[], None],
                         on_fail: Callable[[], None] | None = None) -> None:
        """Admit now if the grammar is ready, else park. A grammar that failed raises ValueError
        (the caller answers it), or, with `on_fail`, is reported like a parked one's failure."""
        state = req.grammar
        status = state.poll() if state is not None else GrammarStatus.READY
        if status is GrammarStatus.READY:
            admit()
        elif status is GrammarStatus.COMPILING:
            self.waiting[req.request_id] = _Parked(req, admit, on_fail, self.clock() + MAX_COMPILE_S)
        elif on_fail is None:
            raise ValueError(state.error)
        else:
            on_fail()
            self.failed.append((req.request_id, state.error, False))

    def admit_ready(self) -> None:
        """Once per step: admit the requests whose grammar finished compiling; fail those whose
        compile failed or ran past its deadline."""
        now = self.clock()
        for rid, parked in list(self.waiting.items()):
            state = parked.request.grammar
            status = state.poll()
            if status is GrammarStatus.COMPILING and now <= parked.deadline:
                continue
            del self.waiting[rid]
            if status is GrammarStatus.READY:
                try:
                    parked.admit()
                except ValueError as exc:  # e.g. the queue filled up while it compiled
                    self._fail(parked, str(exc), isinstance(exc, QueueFull))
            elif status is GrammarStatus.FAILED:
                self._fail(parked, state.error, False)
            else:
                log.warning("%s: its grammar is still compiling after %.0f s; failing it", rid, MAX_COMPILE_S)
                self._fail(parked, f"grammar compilation did not finish within {MAX_COMPILE_S:g} s; "
                                   f"simplify the schema or grammar", False)

    def _fail(self, parked: _Parked, message: str, queue_full: bool) -> None:
        if parked.on_fail is not None:
            parked.on_fail()
        self.failed.append((parked.request.request_id, message, queue_full))

    def drop(self, request_id: str) -> bool:
        return self.waiting.pop(request_id, None) is not None

    def take_failures(self) -> list[tuple[str, str, bool]]:
        failed, self.failed = self.failed, []
        return failed

    def constrain(self, requests: list[Request]) -> StepMask | None:
        """Start the step's mask for the requests that sample (None when no row has a grammar).
        Reads each request's new tokens here; the mask thread owns the matchers until the mask
        is taken (StepMask.result) or settled."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return None
        states, new_tokens = [], []
        for i in rows:
            req = requests[i]
            state = req.grammar
            if state.poll() is GrammarStatus.COMPILING:
                raise RuntimeError(f"{req.request_id} was scheduled while its grammar compiles")  # see check_integrity
            states.append(state)
            new_tokens.append(state.unseen(req.token_ids, req.num_prompt_tokens))
        if self.overlap:
            return StepMask(rows, future=self.backend.submit_mask(states, new_tokens))
        return StepMask(rows, bitmask=self.backend.advance_and_fill(states, new_tokens))

    def check_integrity(self, scheduled: list[Request]) -> None:
        """No request that can be scheduled has a grammar still compiling (it would be parked)."""
        for req in scheduled:
            assert req.grammar is None or req.grammar.status is not GrammarStatus.COMPILING, \
                f"{req.request_id} can be scheduled while its grammar compiles"
            assert req.request_id not in self.waiting, f"{req.request_id} is parked and scheduled"

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()


class DecodeAdmission:
    """The scheduler as a decode worker's KV handoff sees it (apply_scheduler_actions): a request
    whose KV is all here while its grammar still compiles stays WAITING_FOR_KV, holding its blocks,
    and is parked in the gate, which admits it when the compile ends (or frees it if it fails)."""

    def __init__(self, scheduler, gate: GrammarGate) -> None:
        self.scheduler = scheduler
        self.gate = gate

    def reserve_remote(self, request: Request, reuse_tokens: int, count_query: bool = True) -> bool | None:
        return self.scheduler.reserve_remote(request, reuse_tokens, count_query)

    def finish(self, request_id: str) -> Request | None:
        return self.scheduler.finish(request_id)

    def admit_remote(self, request_id: str, first_token: int) -> None:
        req = self.scheduler.waiting_for_kv.get(request_id)
        if req is None:
            return
        scheduler = self.scheduler
        self.gate.admit_when_ready(req, lambda: scheduler.admit_remote(request_id, first_token),
                                   on_fail=lambda: scheduler.finish(request_id))
