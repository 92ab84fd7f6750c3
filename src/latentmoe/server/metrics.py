"""Prometheus metrics of one server: engine load and cache use (read at scrape time), latencies and token counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; covers a fast GPU's first token up to long CPU generations.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """One registry per app, so several servers (or tests) in a process never share counters."""

    def __init__(self, engine, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}

        def stat(key):
            return lambda: float(engine.stats().get(key, 0))

        for name, key, doc in (
                ("latentmoe_num_requests_running", "num_running", "Sequences in the running batch."),
                ("latentmoe_num_requests_waiting", "num_waiting", "Sequences waiting for cache blocks or a slot."),
                ("latentmoe_cache_blocks_used", "num_blocks_used", "Latent-cache blocks held by sequences."),
                ("latentmoe_cache_blocks_total", "num_blocks_total", "Latent-cache blocks in all.")):
            Gauge(name, doc, registry=r).set_function(stat(key))
        for name, key, doc in (
                ("latentmoe_time_to_ready_seconds", "time_to_ready_seconds",
                 "Engine start-up: loading, cache, compilation and graph capture."),
                ("latentmoe_compilations_after_ready", "compilations_after_ready",
                 "Kernel compilations since the engine was ready (start-up should leave none)."),
                ("latentmoe_graph_captures_after_ready", "graph_captures_after_ready",
                 "Decode CUDA-graph captures since the engine was ready (start-up should leave none).")):
            Gauge(name, doc, registry=r).set_function(stat(key))
        Gauge("latentmoe_engine_healthy", "1 while the engine loop runs.", registry=r).set_function(
            lambda: float(engine.healthy))
        self.ttft = Histogram("latentmoe_time_to_first_token_seconds", "Arrival to first generated token.",
                              labelnames=list(labels), buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("latentmoe_e2e_request_latency_seconds", "Arrival to the last token.",
                             labelnames=list(labels), buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.prompt_tokens = Counter("latentmoe_prompt_tokens", "Prompt tokens of finished requests.",
                                     labelnames=list(labels), registry=r).labels(**labels)
        self.generation_tokens = Counter("latentmoe_generation_tokens", "Generated tokens (aborted ones too).",
                                         labelnames=list(labels), registry=r).labels(**labels)
        self.requests = Counter("latentmoe_requests", "Finished requests by finish reason.",
                                labelnames=[*labels, "finish_reason"], registry=r)
        self.disconnects = Counter("latentmoe_client_disconnects", "Requests aborted because the client went away.",
                                   labelnames=list(labels), registry=r).labels(**labels)
        self._labels = labels

    def finished(self, reason: str | None) -> None:
        self.requests.labels(**self._labels, finish_reason=reason or "none").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
