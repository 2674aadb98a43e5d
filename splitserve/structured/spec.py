"""What a request constrains its output to: one small, hashable value that travels with SamplingParams.

The gateway builds a `GrammarSpec` from `response_format`, `structured_outputs` or forced tool
calls; every worker that touches the request (aggregated, prefill, decode, a failover's new
placement) compiles the same spec, so the constraint needs no state of its own on the wire.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

MAX_GRAMMAR_SOURCE_BYTES = 256 * 1024


class GrammarKind(str, enum.Enum):
    JSON_SCHEMA = "json_schema"  # source: the schema as canonical JSON
    REGEX = "regex"
    LARK = "lark"  # llguidance's Lark dialect (choices, GBNF and tool calls are translated to it)


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # a GrammarKind value (a plain str so msgspec carries it as one)
    source: str

    def __post_init__(self) -> None:
        if self.kind not in {k.value for k in GrammarKind}:
            raise ValueError(f"unknown grammar kind {self.kind!r}")
        if len(self.source.encode()) > MAX_GRAMMAR_SOURCE_BYTES:
            raise ValueError(f"the grammar is larger than {MAX_GRAMMAR_SOURCE_BYTES} bytes")

    @property
    def key(self) -> str:
        """The compile cache's key: a hash of kind and source."""
        return hashlib.blake2b(f"{self.kind}\0{self.source}".encode(), digest_size=16).hexdigest()
