"""Prometheus metrics for the worker and the OpenAI API (`GET /metrics`, text exposition format).

Each app owns its registry (not prometheus_client's global one), so two apps in one process, as in
tests, never collide. Gauges that the engine already counts (running, waiting, KV budget) are read
from its status() at scrape time rather than mirrored.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds; CPU demo runs sit at the low end, 13B models on a busy GPU at the high end.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# Outcomes of a request, one word each.
STOP, LENGTH, ABORTED, ERROR, REJECTED = "stop", "length", "aborted", "error", "rejected"


class _StatusCollector(Collector):
    """running / waiting requests and every numeric `kv_*` key of the engine's status, as gauges."""

    def __init__(self, prefix: str, status: Callable[[], dict]) -> None:
        self.prefix, self.status = prefix, status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            st = self.status()
        except Exception:  # the engine is not up yet: no gauges rather than a failed scrape
            return
        names = {"running": "requests decoding now", "waiting": "requests queued for a slot"}
        for key, value in st.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key in names:
                yield GaugeMetricFamily(f"{self.prefix}_requests_{key}", names[key], value=value)
            elif key.startswith("kv_"):
                yield GaugeMetricFamily(f"{self.prefix}_{key}", f"engine status {key}", value=value)


class ServeMetrics:
    """Requests by outcome, tokens, time to first token and end-to-end latency."""

    def __init__(self, prefix: str, status: Optional[Callable[[], dict]] = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{prefix}_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{prefix}_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds", "request arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram(f"{prefix}_request_latency_seconds", "request arrival to its end",
                                 buckets=LATENCY_BUCKETS, registry=r)
        if status is not None:
            r.register(_StatusCollector(prefix, status))

    def track(self) -> "RequestTrack":
        return RequestTrack(self)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTrack:
    """One request's timings; `done` records it once."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first_token: Optional[float] = None
        self.recorded = False

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
            self.metrics.ttft.observe(self.first_token - self.start)

    def done(self, outcome: str, usage: Optional[dict] = None) -> None:
        if self.recorded:
            return
        self.recorded = True
        m = self.metrics
        m.requests.labels(outcome).inc()
        if outcome != REJECTED:
            m.latency.observe(time.monotonic() - self.start)
        if usage:
            m.prompt_tokens.inc(usage.get("prompt_tokens") or 0)
            m.generation_tokens.inc(usage.get("completion_tokens") or 0)
