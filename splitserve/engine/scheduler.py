"""The engine scheduler: pure Python, shared by the live engine and the simulator.

`schedule()` returns a StepPlan; the caller executes it (a model runner or a cost model) and
hands the sampled tokens to `update()`. No torch, no I/O, no clock.

Policy (one code path, no phase flag):
  1. Running requests first, in arrival order: each gets the tokens it still lacks (1 for
     decode, a chunk for a long prefill), within the step's token budget. When blocks run
     out, the newest running request is preempted (its blocks freed, recomputed later).
  2. Then requests whose KV arrived from a prefill worker (they hold their blocks already).
  3. Then waiting requests, oldest first, reusing cached prefix blocks, while budget, seats
     and blocks last. Nothing waiting is admitted in a step that had to preempt.

Disaggregation adds two small paths, no phase flag:
  * prefill worker: a `prefill_only` request finishes as FINISHED_REMOTE after its first
    token; the caller ships its KV and frees it.
  * decode worker: `reserve_remote()` gives a request blocks for the KV that will arrive
    (status WAITING_FOR_KV), `admit_remote()` marks the prompt computed, appends the first
    token sampled on the prefill worker, and queues it for a seat in the running batch.

Hot paths (the simulator runs millions of steps through this same code): a plan is a list of
(request, start, num_tokens, sample) tuples (`StepPlan.chunks` builds objects only when read);
running decodes take the decode lane in schedule() (no budget check each; an allocation only on a
block boundary, with the general path behind it when that fails); update() skips
the stop check below `Request.stop_check_len`; `advance()` is update() without event objects.
tests/test_scheduler.py checks all of them against the general path, step by step.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

from splitserve.config import SchedulerConfig
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.request import Request, RequestStatus


class QueueFull(ValueError):
    """The scheduler holds max_num_seqs + max_waiting requests already (the server answers 503)."""


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    start: int  # tokens already in the KV cache
    num_tokens: int  # tokens computed this step: token_ids[start : start + num_tokens]
    sample: bool  # True when this step reaches the end of the known tokens

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


class StepPlan:
    """One step's work: `items` are (request, start, num_tokens, sample) tuples in plan order.

    `chunks` gives the same as ScheduledChunk objects, built on first access (the model runner
    and the KV sender read them; the simulator and update() read `items`, so a step allocates
    one tuple per sequence and no object)."""

    __slots__ = ("items", "preempted", "_chunks", "_num_tokens")

    def __init__(self, chunks: list[ScheduledChunk] | None = None, preempted: list[str] | None = None) -> None:
        self._chunks: list[ScheduledChunk] | None = None
        self._num_tokens: int | None = None  # schedule() knows the total from its budget: no sum
        self.items: list[tuple[Request, int, int, bool]] = (
            [(c.request, c.start, c.num_tokens, c.sample) for c in chunks] if chunks else [])
        self.preempted: list[str] = preempted if preempted is not None else []

    @property
    def chunks(self) -> list[ScheduledChunk]:
        chunks = self._chunks
        if chunks is None or len(chunks) != len(self.items):
            chunks = self._chunks = [ScheduledChunk(r, s, n, smp) for r, s, n, smp in self.items]
        return chunks

    @property
    def num_tokens(self) -> int:
        n = self._num_tokens
        return n if n is not None else sum(it[2] for it in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepPlan):
            return NotImplemented
        return self.items == other.items and self.preempted == other.preempted

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"StepPlan(chunks={self.chunks!r}, preempted={self.preempted!r})"


@dataclass(slots=True)
class TokenEvent:
    """What one request gained in a step: at most one new token, maybe a finish."""

    request: Request
    new_token: int | None
    finished: bool


class Scheduler:
    # schedule()'s decode lane (below). It plans exactly what the general path would; off only to
    # test that (tests/test_scheduler.py runs the same workloads both ways).
    decode_lane = True

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.waiting_for_kv: dict[str, Request] = {}
        self.kv_ready: deque[Request] = deque()
        self._arrivals = 0
        self.num_preemptions = 0

    # ---- admission -----------------------------------------------------------------------
    def add_request(self, request: Request, resumed: bool = False) -> None:
        """Queue a request. At most max_num_seqs + max_waiting requests are held (running,
        waiting, or holding KV from elsewhere); beyond, QueueFull. `resumed`: placed again after a
        fault elsewhere; it waited its turn once already, so it goes to the front of the queue
        (and past the bound: the server admitted it already)."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        limit = self.config.max_model_len
        if request.num_tokens >= limit:
            raise ValueError(f"prompt of {request.num_tokens} tokens does not fit max_model_len={limit}")
        if not resumed and len(self.requests) >= self.config.max_num_seqs + self.config.max_waiting:
            raise QueueFull(f"{len(self.requests)} requests are held already (max_num_seqs + max_waiting)")
        request.arrival_index = self._arrivals
        self._arrivals += 1
        request.status = RequestStatus.WAITING
        request.stop_check_len = self._stop_check_len(request)
        self.requests[request.request_id] = request
        if resumed:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_work(self) -> bool:
        """Something a step could compute (requests waiting only for KV cannot be stepped)."""
        return bool(self.running or self.waiting or self.kv_ready)

    def is_idle(self) -> bool:
        return (not self.requests and not self.waiting and not self.running and not self.waiting_for_kv
                and not self.kv_ready and self.block_manager.is_idle())

    @property
    def num_waiting_tokens(self) -> int:
        """Prompt tokens still to compute: the router's measure of a prefill worker's queue."""
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting) + sum(
            r.num_tokens - r.num_computed_tokens for r in self.running if r.num_tokens - r.num_computed_tokens > 1)

    # ---- KV from elsewhere (decode worker of a disaggregated pair) ---------------------------
    def reserve_remote(self, request: Request, reuse_tokens: int, count_query: bool = True) -> bool | None:
        """Give `request` blocks for its prompt; KV for tokens [reuse_tokens, num_tokens) will arrive.

        The first `reuse_tokens` (block aligned) must come from this worker's prefix cache.
        Returns True when reserved; False, changing nothing, when space is short (retry later);
        None, changing nothing, when the cache no longer holds that prefix. `count_query`: count
        this lookup in the prefix-cache statistics (once per request, not on every retry).
        """
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"duplicate request id {rid!r}")
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(f"prompt of {request.num_tokens} tokens does not fit max_model_len={self.config.max_model_len}")
        bm = self.block_manager
        bs = bm.block_size
        if reuse_tokens % bs:
            raise ValueError("reuse_tokens must be a multiple of the block size")
        computed, _ = bm.get_computed_blocks(request, count_query)
        if len(computed) * bs < reuse_tokens:
            return None
        computed = computed[: reuse_tokens // bs]
        if not bm.allocate_slots(request, request.num_tokens, computed):
            return False
        request.arrival_index = self._arrivals
        self._arrivals += 1
        request.num_computed_tokens = reuse_tokens
        request.num_cached_tokens = reuse_tokens
        request.status = RequestStatus.WAITING_FOR_KV
        request.stop_check_len = self._stop_check_len(request)
        self.requests[rid] = request
        self.waiting_for_kv[rid] = request
        return True

    def admit_remote(self, request_id: str, first_token: int) -> Request | None:
        """All KV landed: the prompt is computed, the first token is known. Queue for a seat."""
        req = self.waiting_for_kv.pop(request_id, None)
        if req is None:
            return None
        req.num_computed_tokens = req.num_tokens
        self.block_manager.cache_full_blocks(req)
        req.append_token(first_token)
        req.status = RequestStatus.WAITING
        self.kv_ready.append(req)
        return req

    # ---- planning ------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        items = plan.items
        append = items.append
        preempted = plan.preempted
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        tables = bm.req_blocks
        bs = bm.block_size
        running = self.running

        i = 0
        n = len(running)
        lane = self.decode_lane
        allocate = bm.allocate_slots
        while i < n and budget > 0:
            if lane and n - i <= budget:
                # Decode lane: while every remaining sequence fits the budget, a sequence that
                # decodes one token needs no budget check, and no allocation unless it starts a
                # block. Exactly what the general path below decides for it: a running request's
                # table covers its computed tokens (start % bs != 0 means start < len(table) * bs),
                # and on a block boundary it makes the same allocate_slots call; when that fails
                # (it then changes nothing) the general path retries it and preempts.
                before = len(items)
                for req in (running if i == 0 else running[i:]):
                    start = req.num_computed_tokens
                    if len(req.token_ids) - start != 1:
                        break  # a prompt chunk
                    if not start % bs and not allocate(req, start + 1):
                        break  # no free block: the general path preempts
                    append((req, start, 1, True))
                k = len(items) - before
                i += k
                budget -= k
                if i >= n:
                    break
            req = running[i]
            start = req.num_computed_tokens
            num_new = len(req.token_ids) - start
            if num_new == 1:  # decode: no allocation while the last block has room
                table = tables.get(req.request_id)
                if table is not None and start < len(table) * bs:
                    append((req, start, 1, True))
                    budget -= 1
                    i += 1
                    continue
            num_new = min(num_new, budget)
            if num_new <= 0:  # nothing to compute (should not happen); keep it seated
                i += 1
                continue
            scheduled = True
            while not bm.allocate_slots(req, start + num_new):
                victim = running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    scheduled = False
                    break
            n = len(running)
            if not scheduled:
                break
            append((req, start, num_new, start + num_new == len(req.token_ids)))
            budget -= num_new
            i += 1

        max_seqs = self.config.max_num_seqs
        kv_ready = self.kv_ready
        while not preempted and kv_ready and budget > 0 and len(running) < max_seqs:
            req = kv_ready[0]
            if not bm.allocate_slots(req, req.num_tokens):
                break
            kv_ready.popleft()
            req.status = RequestStatus.RUNNING
            running.append(req)
            start = req.num_computed_tokens
            num_new = len(req.token_ids) - start
            append((req, start, num_new, True))
            budget -= num_new

        if not preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < max_seqs:
                req = waiting[0]
                if req.sampling_params.prompt_logprobs is None:
                    computed_blocks, num_cached = bm.get_computed_blocks(req)
                else:  # prompt logprobs need every prompt position computed here: no prefix-cache reuse
                    computed_blocks, num_cached = [], 0
                num_new = min(req.num_tokens - num_cached, budget)
                if not bm.allocate_slots(req, num_cached + num_new, computed_blocks):
                    break
                waiting.popleft()
                req.num_computed_tokens = num_cached
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_cached
                req.status = RequestStatus.RUNNING
                running.append(req)
                append((req, num_cached, num_new, num_cached + num_new == len(req.token_ids)))
                budget -= num_new
        # Every item above took its token count out of the budget.
        plan._num_tokens = self.config.max_num_batched_tokens - budget
        return plan

    def _stop_check_len(self, req: Request) -> int:
        """The token count below which update() need not check `req` for a stop (see Request)."""
        params = req.sampling_params
        if params.ignore_eos and not params.stop_token_ids and not req.prefill_only:
            return min(req.num_prompt_tokens + params.max_tokens, self.config.max_model_len)
        return 0

    def _preempt(self, req: Request) -> None:
        """Free everything and recompute later: the prefix cache usually makes that cheap."""
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- results -------------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[TokenEvent]:
        """Apply a step's results. `sampled` maps request id to the token drawn for it."""
        got, _ = self.advance(plan, sampled)
        running = RequestStatus.RUNNING
        # Right after advance() a request it finished is no longer RUNNING and its last token is
        # the one drawn this step.
        return [TokenEvent(r, r.token_ids[-1], r.status != running) for r in got]

    def advance(self, plan: StepPlan, sampled: Any) -> tuple[list[Request], list[Request]]:
        """update() without event objects: apply a step's results; return the requests that
        gained a token and those of them that finished (released, no longer RUNNING), both in
        plan order. The token each gained is its `token_ids[-1]` until its next step. The
        simulator calls this, with `sampled` one int: the token every request drew (no lookup);
        update() is this plus one TokenEvent per request."""
        got: list[Request] = []
        finished: list[Request] = []
        bs = self.block_manager.block_size
        cache_full_blocks = self.block_manager.cache_full_blocks
        check_stop = self._check_stop
        running_status = RequestStatus.RUNNING
        append = got.append
        const = not isinstance(sampled, dict)
        if const:  # `ids += one` copies 8 bytes into an array("q"); array.append parses its argument
            one = array("q", (sampled,))
        for req, start, num, sample in plan.items:
            # (identity first: statuses are RequestStatus members, and `is` skips IntEnum's compare)
            if req.status is not running_status and req.status != running_status:
                continue  # aborted while the step ran
            req.num_computed_tokens = start + num
            if start % bs + num >= bs:  # a block filled up: publish it to the prefix cache
                cache_full_blocks(req)
            if not sample:
                continue
            ids = req.token_ids
            if const:
                token = sampled
                ids += one
            else:
                token = sampled[req.request_id]
                ids.append(token)
            # Below stop_check_len nothing can stop it (the common case): no check.
            if len(ids) >= req.stop_check_len and check_stop(req, token):
                finished.append(req)
            append(req)
        if finished:
            if len(finished) == 1:
                self.running.remove(finished[0])
            else:
                gone = set(map(id, finished))
                self.running = [r for r in self.running if id(r) not in gone]
            for req in finished:
                self._release(req)
        return got, finished

    def _check_stop(self, req: Request, token: int) -> bool:
        params = req.sampling_params
        num_tokens = len(req.token_ids)
        n_out = num_tokens - req.num_prompt_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                return True
            if params.stop_token_ids and token in params.stop_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = token
                return True
        if n_out >= params.max_tokens or num_tokens >= self.config.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
            return True
        if req.prefill_only:
            req.status = RequestStatus.FINISHED_REMOTE
            return True
        return False

    def finish(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> Request | None:
        """Finish a request from outside (abort, client gone, stop string matched)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING_FOR_KV:
            del self.waiting_for_kv[request_id]
        else:
            for queue in (self.waiting, self.kv_ready):
                try:
                    queue.remove(req)
                except ValueError:
                    pass
        req.status = status
        self._release(req)
        return req

    def _release(self, req: Request) -> None:
        self.block_manager.free(req)
        self.requests.pop(req.request_id, None)

    def check_integrity(self) -> None:
        self.block_manager.check_integrity()
        queues = [self.running, self.waiting, self.kv_ready, list(self.waiting_for_kv.values())]
        ids = [r.request_id for q in queues for r in q]
        assert len(ids) == len(set(ids)), "a request sits in two queues"
        assert set(ids) == set(self.requests), "scheduler queues disagree with the request table"
        assert len(self.running) <= self.config.max_num_seqs
        bs = self.block_manager.block_size
        for r in self.running:
            assert r.status == RequestStatus.RUNNING
            assert r.num_computed_tokens <= r.num_tokens
            # schedule()'s decode lane relies on this: computed tokens always have their slots.
            assert len(self.block_manager.blocks_of(r.request_id)) * bs >= r.num_computed_tokens, \
                f"{r.request_id}: computed tokens beyond its block table"
        for r in self.waiting:
            assert r.request_id not in self.block_manager.req_blocks, f"{r.request_id} waits holding blocks"
        for r in list(self.waiting_for_kv.values()) + list(self.kv_ready):
            assert r.request_id in self.block_manager.req_blocks, f"{r.request_id} lost its reserved blocks"
