"""Prometheus metrics of one app, in a registry of its own (never the process-global default, so
several apps can live in one process, as in the tests)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "LATENCY_BUCKETS", "ServeMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Requests by endpoint and status, latency, requests in flight, queue depth, batch sizes and rejects by reason."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fcnseg_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("fcnseg_request_latency_seconds", "time to answer a request", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("fcnseg_requests_in_flight", "segmentation requests admitted and not yet answered, "
                               "uploads included (at most --max-queue)", registry=self.registry)
        self.queue_depth = Gauge("fcnseg_queue_depth", "segmentation requests waiting or running",
                                 registry=self.registry)
        self.batch_size = Histogram("fcnseg_batch_size", "images per inference batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry)
        self.rejects = Counter("fcnseg_rejects", "requests refused, by reason", ["reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
