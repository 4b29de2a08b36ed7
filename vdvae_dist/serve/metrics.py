"""Batch statistics of a replica as Ray metrics, exported by Ray's metrics agent in
Prometheus format (next to Serve's own request, queue and back-pressure metrics). Serve
tags each with the deployment, replica and application; Prometheus sees them with Ray's
`ray_` prefix (counters also with `_total`).

Made in the replica (`Service.__init__`): a Serve metric needs the replica's context.
"""
from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

PREFIX = "vdvae_serve_"
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class BatchMetrics:
    """`record` is the batcher's observer (batcher.BatchObserver)."""

    def __init__(self):
        self.requests = Counter(PREFIX + "batched_requests", description="/sample requests run in a forward pass")
        self.batches = Counter(PREFIX + "batches", description="forward passes of batched /sample requests")
        self.batch_size = Histogram(PREFIX + "batch_size", description="requests per forward pass",
                                    boundaries=BATCH_SIZE_BOUNDARIES)
        self.queue_wait = Histogram(PREFIX + "queue_wait_seconds", boundaries=SECONDS_BOUNDARIES,
                                    description="a request's wait in the replica from arrival to its forward pass")
        self.forward = Histogram(PREFIX + "forward_seconds", boundaries=SECONDS_BOUNDARIES,
                                 description="seconds per forward pass of a batch")
        self.queued = Gauge(PREFIX + "queued_requests",
                            description="requests waiting in the replica for the next forward pass")

    def record(self, size: int, waits_s: list[float], run_s: float, still_queued: int) -> None:
        self.requests.inc(size)
        self.batches.inc()
        self.batch_size.observe(size)
        for wait in waits_s:
            self.queue_wait.observe(max(0.0, wait))
        self.forward.observe(run_s)
        self.queued.set(still_queued)
