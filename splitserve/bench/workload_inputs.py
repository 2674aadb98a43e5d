"""The inputs a workload draws from: request lengths (`LengthDist`), arrival times (`Arrival`) and
prompt text (`TextSource`), with the hard bounds every workload keeps.

Pure: no I/O, no clock; the simulator imports this through `bench.workloads`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MAX_LEN", "MAX_REQUESTS", "Arrival", "LengthDist", "TextSource", "Tokenizer", "parse_length"]

# Hard bounds: a workload never yields more requests than this, nor lengths outside [1, MAX_LEN].
MAX_REQUESTS = 10_000_000
MAX_LEN = 10_000_000


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# --------------------------------------------------------------------------------------------
# Lengths and arrivals


@dataclass(frozen=True)
class LengthDist:
    """fixed:N | uniform:LOW:HIGH (inclusive) | lognormal:MEDIAN:SIGMA[:MIN:MAX]."""

    kind: str = "fixed"
    value: int = 128  # fixed
    low: int = 1  # uniform bounds; lognormal clipping bounds
    high: int = MAX_LEN
    median: float = 0.0  # lognormal: exp(mu)
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"unknown length distribution {self.kind!r}")
        if self.kind == "fixed" and not 1 <= self.value <= MAX_LEN:
            raise ValueError(f"length must be in [1, {MAX_LEN}], got {self.value}")
        if not 1 <= self.low <= self.high <= MAX_LEN:
            raise ValueError(f"bad length bounds [{self.low}, {self.high}]")
        if self.kind == "lognormal" and (self.median <= 0 or self.sigma < 0):
            raise ValueError("lognormal needs median > 0 and sigma >= 0")

    @classmethod
    def fixed(cls, n: int) -> LengthDist:
        return cls("fixed", value=int(n))

    @classmethod
    def uniform(cls, low: int, high: int) -> LengthDist:
        return cls("uniform", low=int(low), high=int(high))

    @classmethod
    def lognormal(cls, median: float, sigma: float, low: int = 1, high: int = MAX_LEN) -> LengthDist:
        return cls("lognormal", median=float(median), sigma=float(sigma), low=int(low), high=int(high))

    @classmethod
    def lognormal_from_mean(cls, median: float, mean: float, low: int = 1, high: int = MAX_LEN) -> LengthDist:
        """The lognormal with this median and (unclipped) mean: sigma = sqrt(2 ln(mean/median))."""
        sigma = math.sqrt(2.0 * math.log(mean / median)) if mean > median else 0.0
        return cls.lognormal(median, sigma, low, high)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        x = int(round(rng.lognormvariate(math.log(self.median), self.sigma)))
        return min(max(x, self.low), self.high)

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.value)
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        bounds = "" if (self.low, self.high) == (1, MAX_LEN) else f":{self.low}:{self.high}"
        return f"lognormal:{self.median:g}:{self.sigma:.4g}{bounds}"


def parse_length(text: str | int) -> LengthDist:
    """`128`, `fixed:128`, `uniform:64:256`, `lognormal:1020:0.5` or `lognormal:1020:0.5:1:8192`."""
    if isinstance(text, int):
        return LengthDist.fixed(text)
    parts = str(text).strip().split(":")
    try:
        if len(parts) == 1:
            return LengthDist.fixed(int(parts[0]))
        kind, args = parts[0].lower(), parts[1:]
        if kind == "fixed" and len(args) == 1:
            return LengthDist.fixed(int(args[0]))
        if kind == "uniform" and len(args) == 2:
            return LengthDist.uniform(int(args[0]), int(args[1]))
        if kind == "lognormal" and len(args) in (2, 4):
            bounds = (int(args[2]), int(args[3])) if len(args) == 4 else (1, MAX_LEN)
            return LengthDist.lognormal(float(args[0]), float(args[1]), *bounds)
    except ValueError as exc:
        raise ValueError(f"bad length {text!r}: {exc}") from None
    raise ValueError(
        f"bad length {text!r}: use N, uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA[:MIN:MAX]"
    )


@dataclass(frozen=True)
class Arrival:
    """Open-loop arrivals at `rate` per second. rate=inf sends everything at t=0.

    poisson: exponential gaps. gamma: gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)),
    same mean rate; burstiness < 1 is burstier than Poisson, 1 is Poisson, > 1 smoother
    (the convention of vLLM's `--burstiness`). constant: gaps of exactly 1/rate.
    """

    rate: float
    kind: str = "poisson"
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.kind not in ("poisson", "gamma", "constant"):
            raise ValueError(f"unknown arrival process {self.kind!r}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")

    def times(self, rng: random.Random) -> Iterator[float]:
        """Arrival offsets: the first at 0, then cumulative gaps."""
        t = 0.0
        if math.isinf(self.rate):
            while True:
                yield 0.0
        if self.kind == "constant":
            i = 0
            while True:
                yield i / self.rate  # no accumulated rounding
                i += 1
        while True:
            yield t
            if self.kind == "poisson":
                t += rng.expovariate(self.rate)
            else:
                t += rng.gammavariate(self.burstiness, 1.0 / (self.rate * self.burstiness))


# --------------------------------------------------------------------------------------------
# Prompt text


class TextSource:
    """Prompts of real text: random slices of a corpus, tokenized once with the target's tokenizer.

    `sample(n, rng)` returns (token ids, text) where the text re-encodes to n tokens in the common
    case (a slice that starts or ends mid-word may re-tokenize to a slightly different count; one
    correction pass trims or extends it). The corpus text is passed in, never read here.
    """

    def __init__(self, tokenizer: Tokenizer, corpus: str, *, max_corpus_tokens: int = 200_000):
        ids = list(tokenizer.encode(corpus))[:max_corpus_tokens]
        if len(ids) < 16:
            raise ValueError("the corpus is too short to make prompts from")
        self.tokenizer = tokenizer
        self.ids = ids

    def sample(self, n: int, rng: random.Random) -> tuple[tuple[int, ...], str]:
        if n <= 0:
            return (), ""
        ids = self._slice(rng.randrange(len(self.ids)), n)
        text = self.tokenizer.decode(ids)
        again = list(self.tokenizer.encode(text))
        if len(again) != n:
            if len(again) > n:
                again = again[:n]
            else:
                again += self._slice(rng.randrange(len(self.ids)), n - len(again))
            text = self.tokenizer.decode(again)
        return tuple(again), text

    def _slice(self, start: int, n: int) -> list[int]:
        out: list[int] = []
        ids = self.ids
        while len(out) < n:
            take = ids[start : start + (n - len(out))]
            out.extend(take)
            start = 0
        return out
