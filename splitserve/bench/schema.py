"""The results schema shared by `splitserve bench` and the simulator.

One JSON document per run:

    {
      "schema_version": 1,
      "kind": "splitserve.bench.result",
      "config":   RunConfig   -- what was run (endpoint, workload, load, SLOs, seed, ...)
      "summary":  Summary     -- aggregate metrics, e.g. summary.ttft_ms.p50, summary.tpot_ms.mean
      "requests": [RequestRecord, ...]   -- one record per request, in issue order
    }

A rate sweep is `{"schema_version": 1, "kind": "splitserve.bench.sweep", "runs": [result, ...]}`.

Units: times inside records and summaries are milliseconds (`*_ms`), except `start_s` and
`duration_s` (seconds since the run started, and the run's length). Throughputs are per second.
`docs/bench.md` documents every field. This module is pure: dataclasses and JSON (de)serialisation,
no clock, no network.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import IO, Any

SCHEMA_VERSION = 1
RESULT_KIND = "splitserve.bench.result"
SWEEP_KIND = "splitserve.bench.sweep"

# Error kinds a record may carry (`RequestRecord.error`). HTTP errors are "http_<status>".
ERROR_KINDS = (
    "timeout",  # the request did not finish within --timeout (or stalled past it)
    "disconnect",  # the connection dropped, or the stream ended without [DONE] / finish_reason
    "connect",  # could not connect to the server
    "stream_error",  # the server sent an error object inside the stream
    "protocol",  # the stream could not be parsed (bad JSON, not SSE, over the size bound)
    "cancelled",  # the run was interrupted (Ctrl-C) while the request was in flight
    "client_error",  # any other exception in the client (counted, never fatal)
)


@dataclass
class Stats:
    """A distribution: mean, standard deviation and percentiles (linear interpolation)."""

    count: int = 0
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


@dataclass
class Goodput:
    """Requests that met every given SLO (TTFT <= slo_ttft_ms, TPOT <= slo_tpot_ms, longest gap
    between two tokens <= slo_itl_ms)."""

    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    count: int  # requests meeting the SLOs
    requests_per_s: float  # count / duration_s
    fraction: float  # count / all requests issued (failed ones never meet an SLO)
    slo_itl_ms: float | None = None


@dataclass
class RequestRecord:
    """One request as the client saw it. Produced by the bench client or by the simulator."""

    request_id: int
    start_s: float  # when it was sent, seconds since the run started
    ok: bool = False
    ttft_ms: float | None = None  # send -> first content token
    e2e_ms: float | None = None  # send -> end of stream (or -> the error)
    tpot_ms: float | None = None  # (e2e - ttft) / (output_tokens - 1); None when output_tokens < 2
    itl_ms: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    input_tokens: int | None = None  # from `usage` when sent, else from the tokenizer
    output_tokens: int | None = None
    expected_input_tokens: int | None = None  # what the workload asked for
    expected_output_tokens: int | None = None
    token_source: str | None = None  # "usage" | "tokenizer" | "chunks": where the counts came from
    chain_id: int | None = None  # agent chains: which chain, which step of how many
    step: int = 0
    num_steps: int = 1
    error: str | None = None  # an ERROR_KINDS entry or "http_<status>"
    error_detail: str | None = None  # truncated message
    http_status: int | None = None


@dataclass
class Summary:
    num_requests: int = 0  # records (issued requests)
    completed: int = 0
    failed: int = 0
    duration_s: float = 0.0
    interrupted: bool = False  # Ctrl-C: the results are partial
    total_input_tokens: int = 0  # over completed requests
    total_output_tokens: int = 0
    request_throughput: float = 0.0  # completed requests / s
    input_token_throughput: float = 0.0
    output_token_throughput: float = 0.0
    total_token_throughput: float = 0.0
    ttft_ms: Stats = field(default_factory=Stats)
    tpot_ms: Stats = field(default_factory=Stats)
    itl_ms: Stats = field(default_factory=Stats)
    e2e_ms: Stats = field(default_factory=Stats)
    max_itl_ms: Stats = field(default_factory=Stats)  # per request: its longest gap between two tokens
    goodput: Goodput | None = None  # None when no SLO was given
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> count
    num_chains: int = 0  # agent chains: how many started, how many finished every step
    completed_chains: int = 0
    chain_ms: Stats | None = None  # completion time of the completed chains (first send -> last token)
    offered_rate: float | None = None  # requests sent / span of send times (None: all at once)
    steady_state: bool | None = None  # False: later requests took far longer (overload); None: too few


@dataclass
class RunConfig:
    """What was run. Free-form extras go in `extra` so the simulator can add its own."""

    source: str = "bench"  # "bench" (measured) or "sim" (simulated)
    base_url: str | None = None
    endpoint: str = "chat"  # "chat" | "completions"
    model: str | None = None
    workload: dict[str, Any] = field(default_factory=dict)  # name + parameters
    num_requests: int | None = None
    duration_s: float | None = None
    rate: float | None = None  # requests (or chains) per second; None = closed loop
    arrival: str | None = None  # "poisson" | "gamma" | "constant"
    burstiness: float | None = None  # gamma shape; 1 = Poisson, < 1 burstier
    concurrency: int | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_itl_ms: float | None = None
    seed: int = 0
    ignore_eos: bool = True
    timeout_s: float | None = None
    tokenizer: str | None = None  # what counted the tokens of prompts (and outputs without usage)
    label: str | None = None
    started_at: str | None = None  # ISO 8601, UTC
    splitserve_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchResult:
    config: RunConfig
    summary: Summary
    requests: list[RequestRecord] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    kind: str = RESULT_KIND


# --------------------------------------------------------------------------------------------
# JSON


def _clean(value: Any) -> Any:
    """NaN/inf -> None so the JSON is strict; floats rounded to 1 ns-in-ms precision."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass (result, record, summary, ...) as plain JSON-ready data."""
    if isinstance(obj, BenchResult):
        return {
            "schema_version": obj.schema_version,
            "kind": obj.kind,
            "config": _clean(dataclasses.asdict(obj.config)),
            "summary": _clean(dataclasses.asdict(obj.summary)),
            "requests": [_record_dict(r) for r in obj.requests],
        }
    return _clean(dataclasses.asdict(obj))


def _record_dict(r: RequestRecord) -> dict[str, Any]:
    d = dict(r.__dict__)
    d["itl_ms"] = [round(x, 4) for x in r.itl_ms]  # 0.1 us resolution keeps files small
    return _clean(d)


def _build(cls: type, data: dict[str, Any] | None) -> Any:
    """Dataclass from a dict, ignoring unknown keys (newer writers) and missing ones (defaults)."""
    if data is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def summary_from_dict(data: dict[str, Any]) -> Summary:
    s = _build(Summary, data)
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "max_itl_ms"):
        setattr(s, name, _build(Stats, data.get(name)) or Stats())
    s.chain_ms = _build(Stats, data.get("chain_ms"))
    s.goodput = _build(Goodput, data.get("goodput"))
    s.errors = dict(data.get("errors") or {})
    return s


def result_from_dict(data: dict[str, Any]) -> BenchResult:
    if data.get("kind", RESULT_KIND) != RESULT_KIND:
        raise ValueError(f"not a bench result: kind={data.get('kind')!r}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is newer than this reader ({SCHEMA_VERSION})")
    return BenchResult(
        config=_build(RunConfig, data.get("config") or {}),
        summary=summary_from_dict(data.get("summary") or {}),
        requests=[_build(RequestRecord, r) for r in data.get("requests") or []],
        schema_version=version,
    )


def dump_result(result: BenchResult, fp: IO[str]) -> None:
    json.dump(to_dict(result), fp, allow_nan=False, separators=(",", ":"))
    fp.write("\n")


def dumps_sweep(results: list[BenchResult]) -> str:
    doc = {"schema_version": SCHEMA_VERSION, "kind": SWEEP_KIND, "runs": [to_dict(r) for r in results]}
    return json.dumps(doc, allow_nan=False, separators=(",", ":")) + "\n"


def write_json(path: str, results: BenchResult | list[BenchResult]) -> None:
    """Write one result, or a sweep (a list of results), atomically (tmp file + rename)."""
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fp:
        if isinstance(results, BenchResult):
            dump_result(results, fp)
        else:
            fp.write(dumps_sweep(results))
    os.replace(tmp, path)


def load_results(path: str) -> list[BenchResult]:
    """A result file or a sweep file -> list of results (one for a single run)."""
    with open(path, encoding="utf-8") as fp:
        data = json.load(fp)
    if isinstance(data, dict) and data.get("kind") == SWEEP_KIND:
        return [result_from_dict(r) for r in data.get("runs") or []]
    return [result_from_dict(data)]
