"""Prometheus metrics with stable names. Counters and histograms are per process (multiprocess-safe
when PROMETHEUS_MULTIPROC_DIR is set); job and queue gauges are read from Redis at scrape time,
so every API replica reports the same truth."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

STAGES = ("read", "encode", "stitch", "upload")

tiles_processed = Counter("tilefm_tiles_processed_total", "Tiles encoded and stored", ["model", "backend"])
tiles_failed = Counter("tilefm_tiles_failed_total", "Tiles that failed for good", ["model", "backend"])
stage_seconds = Histogram(
    "tilefm_stage_seconds",
    "Time per stage of a batch or job",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
ray_actors = Gauge("tilefm_ray_actors", "Encoder actors this scheduler holds", multiprocess_mode="max")
http_requests = Counter("tilefm_http_requests_total", "HTTP requests", ["route", "method", "status"])
http_seconds = Histogram(
    "tilefm_http_request_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

tile_seconds = Histogram(
    "tilefm_tile_request_seconds",
    "Tiler request latency",
    ["route", "format"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
)
tile_cache = Counter("tilefm_tile_cache_requests_total", "Rendered-tile cache lookups", ["result"])


class JobStoreCollector(Collector):
    """Jobs by state and queue depth, straight from the job store."""

    def __init__(self, store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_state = GaugeMetricFamily("tilefm_jobs", "Jobs by state", labels=["state"])
        try:
            counts = self.store.counts_by_state()
            depth = self.store.queue_depth()
        except Exception:  # noqa: BLE001 - Redis down, or any other failure: /readyz says so; the scrape still succeeds
            return
        for state, n in counts.items():
            by_state.add_metric([state.value], n)
        yield by_state
        queue = GaugeMetricFamily("tilefm_queue_depth", "Jobs waiting to run")
        queue.add_metric([], depth)
        yield queue


def render(registry: CollectorRegistry | None = None, extra: list[Collector] | None = None) -> bytes:
    """The exposition text for this process (or all worker processes in multiprocess mode)."""
    from prometheus_client import REGISTRY, multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    registry = registry or REGISTRY
    text = generate_latest(registry)
    if extra:
        scratch = CollectorRegistry()
        for c in extra:
            scratch.register(c)
        text += generate_latest(scratch)
    return text
