"""One choice of a response: incremental detokenization, stop strings and logprobs bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.cluster.messages import TokenOut
from splitserve.engine.sampling_params import SamplingParams
from splitserve.models.tokenizer import Tokenizer


@dataclass
class LogprobEntry:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class ChoiceState:
    index: int
    params: SamplingParams
    tokenizer: Tokenizer
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[LogprobEntry] | None = None  # positions 1..n-1 of the prompt

    def __post_init__(self) -> None:
        self._decoder = self.tokenizer.incremental_decoder(self.params.skip_special_tokens)
        self._hold = max((len(s) for s in self.params.stop), default=1) - 1

    def add(self, out: TokenOut) -> bool:
        """Fold one worker output in. Returns True when a stop string just ended the choice."""
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens or self.num_cached_tokens
        stopped_by_string = False
        prompt_lps = out.prompt_logprobs
        if prompt_lps and self.prompt_logprobs is None and not self.token_ids:  # a re-placement's repeat is dropped
            self.prompt_logprobs = [LogprobEntry(-1, lp, list(top or [])) for _, lp, top in prompt_lps]
        if out.token is not None:
            self.token_ids.append(out.token)
            if out.logprob is not None:
                self.logprobs.append(LogprobEntry(out.token, out.logprob, out.top_logprobs or []))
            is_stop_token = out.finish_reason == "stop" and (
                out.stop_reason is not None or out.token in self.tokenizer.eos_token_ids)
            if not is_stop_token:  # the EOS / stop token itself is never shown
                before = len(self.text)
                self.text += self._decoder.step(out.token)
                stopped_by_string = self._check_stop_strings(before)
        if out.finish_reason is not None and self.finish_reason is None:
            self.text += self._decoder.flush()
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
        return stopped_by_string

    def _check_stop_strings(self, before: int) -> bool:
        if not self.params.stop or self.finish_reason is not None:
            return False
        start = max(0, before - self._hold)
        best = None
        for s in self.params.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        self.finish_reason, self.stop_reason = "stop", s
        return True

    def take_delta(self) -> str:
        """Text safe to stream now. While a stop string could still be forming, its possible
        prefix is held back, so a client never sees text that a stop string later removes."""
        limit = len(self.text) if self.finish_reason is not None else max(self.emitted, len(self.text) - self._hold)
        delta = self.text[self.emitted : limit]
        self.emitted = limit
        return delta

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
