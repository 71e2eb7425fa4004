"""Prometheus metrics of a server: requests, tokens, queue depth, time to first token and the
gap between tokens (histograms), on a registry of its own (two servers in one process never mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("alloy_requests", "Requests accepted, by endpoint", ["endpoint"], registry=registry)
        self.rejected = Counter("alloy_requests_rejected", "Requests refused with 429 (queue full)", registry=registry)
        self.finished = Counter("alloy_requests_finished", "Requests finished, by reason", ["reason"], registry=registry)
        self.prompt_tokens = Counter("alloy_prompt_tokens", "Prompt tokens accepted", registry=registry)
        self.generated_tokens = Counter("alloy_generated_tokens", "Tokens generated", registry=registry)
        self.queue_depth = Gauge("alloy_queue_depth", "Requests waiting for a batch row", registry=registry)
        self.active = Gauge("alloy_active_requests", "Requests in the running batch", registry=registry)
        self.ttft = Histogram("alloy_time_to_first_token_seconds", "Submission to first token",
                              buckets=LATENCY_BUCKETS_S, registry=registry)
        self.itl = Histogram("alloy_inter_token_latency_seconds", "Gap between a request's tokens",
                             buckets=LATENCY_BUCKETS_S, registry=registry)

    # the engine's observer interface (called from its thread; prometheus_client is thread-safe)
    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated_tokens.inc()

    def on_token(self, gap_s: float) -> None:
        self.itl.observe(gap_s)
        self.generated_tokens.inc()

    def on_finish(self, handle, reason: str) -> None:
        self.finished.labels(reason).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
