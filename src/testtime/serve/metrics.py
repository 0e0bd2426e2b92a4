"""Prometheus metrics of a server, on its own registry (`GET /metrics`)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)


class ServeMetrics:
    def __init__(self, shared: Any, server: Any):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("testtime_requests", "Requests answered, by strategy and HTTP status",
                                ["strategy", "status"], registry=r)
        self.latency = Histogram("testtime_request_seconds", "Time from a request's arrival to its answer",
                                 ["strategy"], buckets=LATENCY_BUCKETS, registry=r)
        self.samples = Histogram("testtime_samples_per_request", "Candidates a request's strategy produced",
                                 ["strategy"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.tokens = Counter("testtime_request_tokens", "Tokens billed to answered requests, by kind",
                              ["kind"], registry=r)
        Gauge("testtime_requests_in_server", "Requests admitted and not yet answered (the bounded queue)",
              registry=r).set_function(lambda: server.admitted)
        Gauge("testtime_samples_waiting", "Samples waiting for room in the engine",
              registry=r).set_function(lambda: shared.waiting)
        Gauge("testtime_samples_running", "Samples the engine holds and has not finished",
              registry=r).set_function(lambda: shared.inflight)
        Gauge("testtime_generated_tokens_per_second", "Tokens the engine generated per second, last 10 s",
              registry=r).set_function(lambda: shared.tokens_per_s())
        Gauge("testtime_generated_tokens", "Tokens the engine generated since start (every sample)",
              registry=r).set_function(lambda: shared.generated)

    def request(self, strategy: str, status: int, seconds: float, job: Any = None) -> None:
        self.requests.labels(strategy, str(status)).inc()
        if job is not None and status == 200:
            self.latency.labels(strategy).observe(seconds)
            if job.result:
                self.samples.labels(strategy).observe(job.result.get("candidates", 0))
            self.tokens.labels("prompt").inc(float(job.usage.prompt))
            self.tokens.labels("completion").inc(float(job.usage.decode))

    async def route(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
