"""Prometheus metrics. Names follow vLLM's (`vllm:x` -> `splitserve:x`) so its Grafana dashboards
carry over by changing the prefix."""

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
        s = self.client.stats
        labels = ["model_name"]
        vals = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(vals, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(vals, value)
            return c

        running = s.num_running if s else 0
        waiting = s.num_waiting if s else 0
        used = s.kv_blocks_used if s else 0
        free = s.kv_blocks_free if s else 0
        total = used + free
        yield gauge("splitserve:num_requests_running", "Requests in the engine's running batch.", running)
        yield gauge("splitserve:num_requests_waiting", "Requests waiting in the engine queue.", waiting)
        yield gauge("splitserve:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", used / total if total else 0.0)
        yield gauge("splitserve:kv_blocks_used", "KV cache blocks held by requests or awaiting reuse.", used)
        yield gauge("splitserve:kv_blocks_free", "KV cache blocks free.", free)
        yield gauge("splitserve:num_requests_inflight", "Requests accepted by the gateway and not finished.",
                    self.client.num_inflight)
        yield counter("splitserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_queried_tokens if s else 0)
        yield counter("splitserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_hit_tokens if s else 0)
        yield counter("splitserve:num_preemptions", "Requests preempted for lack of KV blocks.",
                      s.num_preemptions if s else 0)
        yield counter("splitserve:engine_restarts", "Engine worker restarts after a crash.", self.client.num_restarts)


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
