"""Finished simulated requests: bench RequestRecords, kept or streamed to a JSONL file."""

from __future__ import annotations

import json

from splitserve.bench.metrics import SummaryBuilder
from splitserve.bench.schema import RequestRecord


class RecordSink:
    """Collects finished requests as bench RequestRecords, or streams them to a JSONL file and
    keeps only compact arrays (bounded memory for million-request runs). Either way its
    `builder` (bench.metrics.SummaryBuilder, the one summary and SLO check) sees every record."""

    def __init__(self, stream_path: str | None = None, keep_records: bool = True,
                 slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                 slo_itl_ms: float | None = None):
        self.records: list[RequestRecord] = []
        self.keep = keep_records and stream_path is None
        self.builder = SummaryBuilder(slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, slo_itl_ms=slo_itl_ms,
                                      exact_itl=self.keep)
        self.fp = open(stream_path, "w", encoding="utf-8") if stream_path else None

    def add(self, rec: RequestRecord) -> None:
        self.builder.add(rec)
        if self.keep:
            self.records.append(rec)
        elif self.fp is not None:
            from splitserve.bench.schema import _record_dict

            self.fp.write(json.dumps(_record_dict(rec), separators=(",", ":")))
            self.fp.write("\n")

    def summary(self):
        return self.builder.summary()

    def close(self) -> None:
        if self.fp is not None:
            self.fp.close()
            self.fp = None
