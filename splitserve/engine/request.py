"""A request as the scheduler sees it: token ids and how many of them have KV in the cache.

There is no phase flag. Prefill, chunked prefill, prefix-cache hits, recompute after preemption
and decode are all `num_computed_tokens < num_tokens`; the scheduler closes the gap a budget at
a time.
"""

from __future__ import annotations

import enum
from array import array
from typing import Any

from splitserve.engine.sampling_params import SamplingParams

try:  # `splitserve accel build` compiles this module with mypyc (splitserve/accel.py)
    from mypy_extensions import mypyc_attr
except ImportError:  # pure Python: the decorator does nothing
    def mypyc_attr(*_attrs: str, **_kw: object) -> Any:  # type: ignore[misc]
        return lambda cls: cls


class RequestStatus(enum.IntEnum):
    WAITING = 0
    WAITING_FOR_KV = 1  # blocks reserved, KV arriving from a prefill worker
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_REMOTE = 7  # prefill worker: first token sampled, decode continues elsewhere

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}  # FINISHED_REMOTE has no client-visible finish reason: the request goes on elsewhere


@mypyc_attr(allow_interpreted_subclasses=True)  # the simulator's SimRequest extends it
class Request:
    __slots__ = (
        "request_id", "token_ids", "num_prompt_tokens", "sampling_params", "num_computed_tokens",
        "num_cached_tokens", "status", "stop_reason", "block_hashes", "arrival_index",
        "num_preemptions", "eos_token_ids", "seed", "prefill_only", "stop_check_len", "grammar",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Any,  # a list of ints, or an array("q")
        sampling_params: SamplingParams,
        eos_token_ids: Any = frozenset(),  # any container of ints
        arrival_index: int = 0,
        seed: int | None = None,
        output_token_ids: Any = None,
        prefill_only: bool = False,
    ) -> None:
        """`output_token_ids`: tokens already generated (and sent to the client) by a worker that
        died or handed off; they are recomputed like prompt tokens but count as output for
        max_tokens, penalties and the sampling stream."""
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        self.request_id = request_id
        # A list, or an array("q") when the prompt comes as one (the simulator: compact, and hashed
        # into prefix-cache keys without a conversion). Both hold the same ids and hash alike.
        self.token_ids: Any = (prompt_token_ids[:] if type(prompt_token_ids) is array
                                     else list(prompt_token_ids))
        if output_token_ids:
            self.token_ids.extend(output_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.prefill_only = prefill_only
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit on first admission; -1 until admitted
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of token_ids
        self.arrival_index = arrival_index
        self.num_preemptions = 0
        # The scheduler's stop-check shortcut: while len(token_ids) < stop_check_len no stop
        # condition can fire (ignore_eos, no stop ids, below max_tokens and max_model_len), so
        # update() skips the check. 0: check every token. Set by the scheduler on admission.
        self.stop_check_len = 0
        # The sampling stream's seed, fixed when the request is created (by the front end, from the
        # user's seed or at random), so every worker that continues this request draws the same tokens.
        if seed is None:
            seed = sampling_params.seed if sampling_params.seed is not None else 0
        self.seed = seed
        # A structured-output matcher (splitserve.structured.matcher.RequestGrammar) when the
        # sampling params carry a grammar; set by the engine.
        self.grammar: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> Any:  # list or array, as token_ids
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> Any:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
