"""Compiled grammars and per-request matchers, in the engine's process.

Compilation never runs on the step loop: `GrammarBackend.start()` returns a `RequestGrammar` in
state COMPILING and a one-thread pool builds the matcher (llguidance drops the GIL while it
compiles); the engine parks the request until `poll()` says READY. Compiled grammars are cached
by the spec's hash; a request gets a copy of the cached matcher.

A matcher's position is a function of the request's output tokens alone: before each sampling
step it consumes the output tokens it has not seen yet (`unseen()`, then `consume()` on the mask
thread, which then computes the step's bitmask while the forward pass runs). That is how a
decode worker, a preempted request or a failover's new placement resumes exactly where generation
stopped: the fresh matcher replays the tokens already generated (the prefill worker's first token
included).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from splitserve.structured.grammar import to_llguidance
from splitserve.structured.spec import GrammarSpec

log = logging.getLogger(__name__)

CACHE_SIZE = 256


class GrammarStatus(enum.Enum):
    COMPILING = "compiling"
    READY = "ready"
    FAILED = "failed"


class RequestGrammar:
    """One request's matcher and how far it has followed the request's output."""

    __slots__ = ("spec", "status", "matcher", "error", "num_consumed", "_future", "_backend")

    def __init__(self, spec: GrammarSpec, backend: GrammarBackend) -> None:
        self.spec = spec
        self.status = GrammarStatus.COMPILING
        self.matcher = None
        self.error = ""
        self.num_consumed = 0  # output tokens the matcher has accepted
        self._future: Future | None = None
        self._backend = backend

    def poll(self) -> GrammarStatus:
        if self.status is GrammarStatus.COMPILING and self._future is not None and self._future.done():
            self._backend.settle(self)
        return self.status

    def wait(self, timeout: float | None = None) -> GrammarStatus:
        if self.status is GrammarStatus.COMPILING and self._future is not None:
            try:
                self._future.result(timeout)
            except Exception:
                pass
        return self.poll()

    def unseen(self, token_ids, num_prompt_tokens: int) -> list[int]:
        """The output tokens the matcher has not consumed yet (read on the engine's thread)."""
        start = num_prompt_tokens + self.num_consumed
        return list(token_ids[start:]) if start < len(token_ids) else []

    def consume(self, new: list[int]) -> None:
        """Advance the matcher over `new` (replay after a handoff or failover: several at once)."""
        if not new:
            return
        self.num_consumed += len(new)
        if not self.matcher.is_error() and not self.matcher.consume_tokens(new):
            log.warning("a generated token broke the grammar: %s", self.matcher.get_error())

    @property
    def is_terminated(self) -> bool:
        """Nothing but EOS may follow: the grammar is complete, broken, or never compiled."""
        return self.matcher is None or self.matcher.is_error() or self.matcher.is_stopped()


class GrammarBackend:
    """llguidance for one model: its tokenizer, the compile pool, the cache of compiled grammars."""

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: frozenset[int],
                 cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self.cache: OrderedDict[str, object] = OrderedDict()  # spec key -> compiled template matcher
        self.compiling: dict[str, Future] = {}
        self.num_compiled = 0
        self.num_cache_hits = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        # Each step's matcher advance + bitmask runs here while the engine's thread runs the
        # forward pass (llguidance drops the GIL while it computes masks).
        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._lltokenizer = None
        self._tokenizer_lock = threading.Lock()
        self._executor = None  # llguidance's parallel mask executor (its default threads: 80% of the cores)
        words = (vocab_size + 31) // 32
        self._eos_only = np.zeros(words, dtype=np.int32)  # what a finished or broken matcher allows
        for t in self.eos_token_ids:
            self._eos_only.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))

    # ---- compiling ---------------------------------------------------------------------------
    def start(self, spec: GrammarSpec) -> RequestGrammar:
        state = RequestGrammar(spec, self)
        key = spec.key
        if key in self.cache:
            self.cache.move_to_end(key)
            self.num_cache_hits += 1
            self._ready(state, self.cache[key])
            return state
        future = self.compiling.get(key)
        if future is None:
            future = self.compiling[key] = self._pool.submit(self._compile, spec)
        state._future = future
        return state

    def settle(self, state: RequestGrammar) -> None:
        """On the engine's thread: move a finished compile into the cache and the request's state."""
        key = state.spec.key
        self.compiling.pop(key, None)
        try:
            template = state._future.result()
        except Exception as exc:
            state.status, state.error = GrammarStatus.FAILED, f"grammar compilation failed: {exc}"
            return
        if key not in self.cache:
            self.cache[key] = template
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        self._ready(state, template)

    @staticmethod
    def _ready(state: RequestGrammar, template) -> None:
        state.matcher = template.deep_copy()
        state.status = GrammarStatus.READY
        state._future = None

    def _compile(self, spec: GrammarSpec):
        import llguidance

        matcher = llguidance.LLMatcher(self.lltokenizer(), to_llguidance(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        self.num_compiled += 1
        return matcher

    def lltokenizer(self):
        """llguidance's view of the model's tokenizer (built once, on the compile thread)."""
        with self._tokenizer_lock:
            if self._lltokenizer is None:
                import llguidance

                from splitserve.models.tokenizer import load_tokenizer

                tok = load_tokenizer(self.tokenizer_path)
                self._lltokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=self.vocab_size,
                                                           eos_token=self.eos_token_ids)
            return self._lltokenizer

    # ---- masking -----------------------------------------------------------------------------
    def advance_and_fill(self, states: list[RequestGrammar], new_tokens: list[list[int]]) -> torch.Tensor:
        """Feed each matcher its unseen tokens, then compute the batch's bitmask (see fill_bitmask)."""
        for state, new in zip(states, new_tokens):
            if state.matcher is not None:
                state.consume(new)
        return self.fill_bitmask(states)

    def submit_mask(self, states: list[RequestGrammar], new_tokens: list[list[int]]) -> Future:
        """advance_and_fill on the mask thread; the matchers are its own until the future is done."""
        return self._mask_pool.submit(self.advance_and_fill, states, new_tokens)

    def fill_bitmask(self, states: list[RequestGrammar]) -> torch.Tensor:
        """One int32 bitmask row per state (bit t of row r: token t allowed), computed in one call."""
        import llguidance

        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty(len(states), words, dtype=torch.int32)
        live = []
        for i, s in enumerate(states):
            if s.is_terminated:
                bitmask[i] = torch.from_numpy(self._eos_only)
            else:
                live.append((s.matcher, i))
        if live:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), words * 4, len(states))
        return bitmask

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._mask_pool.shutdown(wait=True)  # a step's mask never outlives the engine
