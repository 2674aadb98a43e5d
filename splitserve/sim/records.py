"""Finished simulated requests: bench RequestRecords, kept or streamed, with bounded-memory summaries."""

from __future__ import annotations

import json
import math
from array import array
from typing import cast

from splitserve.bench.schema import RequestRecord


class RecordSink:
    """Collects finished requests as bench RequestRecords, or streams them to a JSONL file and
    keeps only compact arrays (bounded memory for million-request runs)."""

    def __init__(self, stream_path: str | None = None, keep_records: bool = True,
                 slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None):
        self.records: list[RequestRecord] = []
        self.slo = (slo_ttft_ms, slo_tpot_ms)
        self.good = 0
        self.keep = keep_records and stream_path is None
        self.fp = open(stream_path, "w", encoding="utf-8") if stream_path else None
        self.ttft = array("d")
        self.tpot = array("d")
        self.e2e = array("d")
        self.n = 0
        self.ok = 0
        self.in_tokens = 0
        self.out_tokens = 0
        self.first_start = math.inf
        self.last_end = 0.0
        self.itl_hist = _LogHistogram()
        self.errors: dict[str, int] = {}
        self.chains: dict[int, list] = {}  # chain_id -> [start, end, steps ok, num_steps]

    def add(self, rec: RequestRecord) -> None:
        self.n += 1
        if rec.ok:
            self.ok += 1
            self.in_tokens += rec.input_tokens or 0
            self.out_tokens += rec.output_tokens or 0
            ttft = cast(float, rec.ttft_ms)  # set on every ok record
            self.ttft.append(ttft)
            self.e2e.append(cast(float, rec.e2e_ms))
            if rec.tpot_ms is not None:
                self.tpot.append(rec.tpot_ms)
            slo_ttft, slo_tpot = self.slo
            if (slo_ttft is None or ttft <= slo_ttft) and \
                    (slo_tpot is None or rec.tpot_ms is None or rec.tpot_ms <= slo_tpot):
                self.good += 1
            if not self.keep:
                self.itl_hist.add_all(rec.itl_ms)
        else:
            self.errors[rec.error or "unknown"] = self.errors.get(rec.error or "unknown", 0) + 1
        self.first_start = min(self.first_start, rec.start_s)
        self.last_end = max(self.last_end, rec.start_s + (rec.e2e_ms or 0.0) / 1000.0)
        if self.keep:
            self.records.append(rec)
        else:
            if rec.chain_id is not None:
                c = self.chains.setdefault(rec.chain_id, [rec.start_s, 0.0, 0, rec.num_steps])
                c[0] = min(c[0], rec.start_s)
                c[1] = max(c[1], rec.start_s + (rec.e2e_ms or 0.0) / 1000.0)
                c[2] += 1 if rec.ok else 0
            if self.fp is not None:
                from splitserve.bench.schema import _record_dict

                self.fp.write(json.dumps(_record_dict(rec), separators=(",", ":")))
                self.fp.write("\n")

    def close(self) -> None:
        if self.fp is not None:
            self.fp.close()
            self.fp = None


class _LogHistogram:
    """Percentiles of a huge stream (pooled ITLs) in bounded memory: 0.5%-wide log bins."""

    BINS_PER_DECADE = 460

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0.0
        self.sq = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add_all(self, values) -> None:
        c = self.counts
        k = self.BINS_PER_DECADE
        for v in values:
            b = int(math.floor(math.log10(v) * k)) if v > 0 else -10**9
            c[b] = c.get(b, 0) + 1
            self.total += v
            self.sq += v * v
            if v < self.min:
                self.min = v
            if v > self.max:
                self.max = v
        self.n += len(values)

    def quantile(self, q: float) -> float:
        target = q / 100.0 * (self.n - 1)
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen > target:
                return 0.0 if b == -10**9 else 10 ** ((b + 0.5) / self.BINS_PER_DECADE)
        return self.max
