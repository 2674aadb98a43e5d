"""Prometheus metrics. Names follow vLLM's (`vllm:x` -> `splitserve:x`) so its Grafana dashboards
carry over by changing the prefix. Engine-side figures come from the workers' latest Stats
messages, summed over the cluster and repeated per worker (`splitserve:worker_*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineStatsCollector:
    """Reads the worker's latest Stats message at scrape time."""

    def __init__(self, client, model_name: str) -> None:
        self.client = client
        self.model_name = model_name

    def collect(self):
        c = self.client
        stats = [(w.worker_id, w.role, w.stats) for w in c.workers.values() if w.stats is not None]
        base = ["model_name"]

        def family(kind, name, doc, value, per_worker=None):
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=base)
            fam.add_metric([self.model_name], value)
            yield fam
            if per_worker is not None:
                pw = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                    name.replace("splitserve:", "splitserve:worker_"), doc + " (per worker)",
                    labels=base + ["worker_id", "role"])
                for wid, role, s in stats:
                    pw.add_metric([self.model_name, wid, role], per_worker(s))
                yield pw

        def total(attr):
            return sum(getattr(s, attr) for _, _, s in stats)

        used, free = total("kv_blocks_used"), total("kv_blocks_free")
        yield from family("gauge", "splitserve:num_requests_running", "Requests in running batches.",
                          total("num_running"), lambda s: s.num_running)
        yield from family("gauge", "splitserve:num_requests_waiting", "Requests waiting in engine queues.",
                          total("num_waiting") + total("num_waiting_for_kv"), lambda s: s.num_waiting + s.num_waiting_for_kv)
        yield from family("gauge", "splitserve:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).",
                          used / (used + free) if used + free else 0.0,
                          lambda s: s.kv_blocks_used / max(1, s.kv_blocks_used + s.kv_blocks_free))
        yield from family("gauge", "splitserve:kv_blocks_used", "KV cache blocks held by requests.", used,
                          lambda s: s.kv_blocks_used)
        yield from family("gauge", "splitserve:kv_blocks_free", "KV cache blocks free.", free, lambda s: s.kv_blocks_free)
        yield from family("gauge", "splitserve:queued_prefill_tokens", "Prompt tokens waiting to be computed.",
                          total("queued_prefill_tokens"), lambda s: s.queued_prefill_tokens)
        yield from family("gauge", "splitserve:num_requests_inflight", "Requests accepted by the gateway.",
                          c.num_inflight)
        yield from family("counter", "splitserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                          total("prefix_queried_tokens"))
        yield from family("counter", "splitserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                          total("prefix_hit_tokens"))
        yield from family("counter", "splitserve:num_preemptions", "Requests preempted for lack of KV blocks.",
                          total("num_preemptions"))
        yield from family("counter", "splitserve:kv_transfer_bytes", "KV bytes moved between workers.",
                          total("kv_bytes_received"))
        yield from family("counter", "splitserve:kv_transfers", "Completed KV transfers.", total("kv_transfers_done"))
        yield from family("counter", "splitserve:kv_transfers_failed", "KV transfers that failed or timed out.",
                          total("kv_transfers_failed"))
        secs = total("kv_transfer_seconds")
        yield from family("counter", "splitserve:kv_transfer_time_seconds",
                          "Seconds from reservation to last layer landed, summed over transfers.", secs)
        yield from family("gauge", "splitserve:kv_transfer_gbps", "Mean KV transfer throughput (GB/s).",
                          total("kv_bytes_received") / secs / 1e9 if secs else 0.0)
        ph = c.phase
        yield from family("counter", "splitserve:request_prefill_time_seconds",
                          "Dispatch to first token (queue + prefill + handoff), summed.", ph["prefill_s"])
        yield from family("counter", "splitserve:request_prefill_count", "Requests timed in the prefill phase.",
                          ph["prefill_n"])
        yield from family("counter", "splitserve:request_decode_time_seconds", "First token to finish, summed.",
                          ph["decode_s"])
        yield from family("counter", "splitserve:request_decode_count", "Requests timed in the decode phase.",
                          ph["decode_n"])
        yield from family("counter", "splitserve:requests_replaced", "Requests placed again after a worker failure.",
                          c.num_replaced)
        yield from family("counter", "splitserve:engine_restarts", "Worker restarts after a crash.", c.num_restarts)


class ServerMetrics:
    def __init__(self, client, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, lab = self.registry, ["model_name"]
        self.ttft = Histogram("splitserve:time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("splitserve:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             lab, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("splitserve:e2e_request_latency_seconds", "End-to-end request latency.", lab,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("splitserve:prompt_tokens", "Prompt tokens processed.", lab, registry=r)
        self.generation_tokens = Counter("splitserve:generation_tokens", "Tokens generated.", lab, registry=r)
        self.request_success = Counter("splitserve:request_success", "Finished requests by finish reason.",
                                       lab + ["finished_reason"], registry=r)
        self.request_errors = Counter("splitserve:request_errors", "Requests answered with an error, by status.",
                                      lab + ["status"], registry=r)
        r.register(_EngineStatsCollector(client, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)
