"""Reading request traces: JSONL rows with a timestamp, an input length (or the messages/prompt
themselves) and an output length, in splitserve's, Azure's or Mooncake's key names.

`bench.workloads.trace_replay` turns the rows into requests. Parsing only: the text is passed in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from splitserve.bench.workload_inputs import MAX_LEN, MAX_REQUESTS

__all__ = ["MAX_MESSAGES", "MAX_TEXT_CHARS", "TraceRow", "parse_trace_lines", "parse_trace_row"]


@dataclass(frozen=True)
class TraceRow:
    timestamp: float  # seconds (absolute or relative; replay uses offsets from the first row)
    input_len: int | None
    output_len: int
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None


_IN_KEYS = ("input_length", "input_len", "input_tokens", "prompt_tokens", "ContextTokens")
_OUT_KEYS = ("output_length", "output_len", "output_tokens", "max_tokens", "GeneratedTokens")
_TS_KEYS = ("timestamp", "TIMESTAMP", "time", "arrival_time")
MAX_MESSAGES = 1_000
MAX_TEXT_CHARS = 4_000_000


def _timestamp(value: Any, unit_s: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) * unit_s
    if isinstance(value, str):
        v = value.strip()
        try:
            return float(v) * unit_s
        except ValueError:
            pass
        # "2023-11-16 18:15:46.6805900": at most 6 fraction digits for fromisoformat
        if "." in v:
            head, frac = v.rsplit(".", 1)
            digits = "".join(ch for ch in frac if ch.isdigit())
            v = f"{head}.{digits[:6]}{frac[len(digits):]}"
        return datetime.fromisoformat(v).timestamp()
    raise ValueError(f"bad timestamp {value!r}")


def parse_trace_row(obj: dict[str, Any], *, time_unit_s: float = 1.0) -> TraceRow:
    """One trace entry: timestamp, input length or messages/prompt, output length.

    Accepts splitserve's own keys (timestamp, input_length, output_length, messages, prompt),
    the Azure CSV column names (TIMESTAMP, ContextTokens, GeneratedTokens) and Mooncake's
    (timestamp in ms with time_unit_s=0.001, input_length, output_length).
    """
    if not isinstance(obj, dict):
        raise ValueError("a trace row must be a JSON object")
    ts = next((obj[k] for k in _TS_KEYS if k in obj), None)
    if ts is None:
        raise ValueError("trace row has no timestamp")
    n_in = next((obj[k] for k in _IN_KEYS if k in obj), None)
    n_out = next((obj[k] for k in _OUT_KEYS if k in obj), None)
    if n_out is None:
        raise ValueError("trace row has no output length")
    n_out = int(n_out)
    if not 1 <= n_out <= MAX_LEN:
        raise ValueError(f"output length {n_out} out of range")
    if n_in is not None:
        n_in = int(n_in)
        if not 1 <= n_in <= MAX_LEN:
            raise ValueError(f"input length {n_in} out of range")
    messages = obj.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
            raise ValueError("messages must be a non-empty list")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError("each message needs a string content")
            clean.append({"role": str(m.get("role", "user")), "content": m["content"][:MAX_TEXT_CHARS]})
        messages = tuple(clean)
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    if n_in is None and messages is None and prompt is None:
        raise ValueError("trace row needs an input length, messages or a prompt")
    return TraceRow(_timestamp(ts, time_unit_s), n_in, n_out, messages, prompt[:MAX_TEXT_CHARS] if prompt else None)


def parse_trace_lines(lines: Iterable[str], *, time_unit_s: float = 1.0, limit: int = MAX_REQUESTS) -> list[TraceRow]:
    """JSONL text -> rows. Blank lines and lines starting with '#' are skipped; a bad line raises
    ValueError naming its line number."""
    rows: list[TraceRow] = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(rows) >= limit:
            break
        try:
            rows.append(parse_trace_row(json.loads(line), time_unit_s=time_unit_s))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"trace line {lineno}: {exc}") from None
    return rows
