"""Prometheus metrics of one server (app): HTTP requests, generations, and the scheduler's counters.

Each app has its own CollectorRegistry, so tests can build several apps in one process. The
scheduler's counters live in the scheduler (kuaida.engine knows nothing of Prometheus) and are read at
scrape time by SchedulerCollector.
"""
from __future__ import annotations

import json
import logging
import time
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kuaida.engine.scheduler import Scheduler
from kuaida.engine.sequence import GenerationStats

log = logging.getLogger(__name__)

# From a cached follow-up turn (~10 ms) to a long cold prompt on a busy CPU (tens of seconds).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# One decode step of the batch: ~10 ms for a 135M model at int8, slower with bigger models or batches.
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)


class SchedulerCollector:
    """Reads the scheduler's counters and gauges when /metrics is scraped."""

    COUNTERS: ClassVar[dict[str, tuple[str, str]]] = {  # SchedulerMetrics field -> (metric name, help)
        "cache_hits": ("kuaida_kv_cache_hits", "Requests that reused a cached KV prefix."),
        "cached_tokens": ("kuaida_cached_prompt_tokens", "Prompt tokens reused from the KV cache."),
        "prefilled_tokens": ("kuaida_prefilled_tokens", "Prompt tokens computed by prefill."),
        "evictions": ("kuaida_kv_cache_evictions", "Idle conversations whose KV cache was overwritten."),
        "decode_steps": ("kuaida_decode_steps", "Batched decode steps."),
        "decoded_tokens": ("kuaida_decoded_tokens", "Tokens decoded, over all requests."),
        "drafted_tokens": ("kuaida_lookup_drafted_tokens", "Prompt-lookup draft tokens verified."),
        "accepted_tokens": ("kuaida_lookup_accepted_tokens", "Prompt-lookup draft tokens kept."),
        "next_turn_tokens": ("kuaida_next_turn_prefilled_tokens",
                             "Chat-template tokens written into idle conversations before their next turn."),
        "typed_tokens": ("kuaida_typed_ahead_prefilled_tokens",
                         "Tokens of messages still being typed (drafts) written into their conversations."),
    }

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        m = self.scheduler.metrics
        for field, (name, doc) in self.COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=getattr(m, field))
        yield GaugeMetricFamily("kuaida_queue_depth", "Requests waiting for a batch slot.",
                                value=self.scheduler.queue_depth)
        yield GaugeMetricFamily("kuaida_batch_size", "Requests in the running batch.",
                                value=len(self.scheduler.active))
        if (passages := self.scheduler.passages) is not None:  # knowledge-base passages encoded once
            p = passages.stats
            yield CounterMetricFamily("kuaida_passage_cache_hits", "Passages whose cached KV was reused.",
                                      value=p.hits)
            yield CounterMetricFamily("kuaida_passage_cache_misses", "Passages encoded (then cached).",
                                      value=p.misses)
            yield CounterMetricFamily("kuaida_passage_cache_evictions", "Cached passages dropped for room.",
                                      value=p.evictions)
            yield GaugeMetricFamily("kuaida_passage_cache_bytes", "Memory held by cached passages.",
                                    value=passages.nbytes)


class ServerMetrics:
    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kuaida_http_requests", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=r)
        self.errors = Counter("kuaida_errors", "Error responses by OpenAI error type.", ["type"], registry=r)
        self.ttft = Histogram("kuaida_time_to_first_token_seconds", "Admission to first token (incl. queue).",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("kuaida_time_per_output_token_seconds",
                              "Mean decode time per token of a reply.", buckets=TPOT_BUCKETS, registry=r)
        self.active = Gauge("kuaida_active_streams", "Generations in flight (queued or decoding).",
                            registry=r)
        self.prompt_tokens = Counter("kuaida_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.completion_tokens = Counter("kuaida_completion_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("kuaida_generations", "Finished generations by finish reason.", ["reason"],
                                registry=r)
        r.register(SchedulerCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def generation_done(self, stats: GenerationStats) -> None:
        self.finished.labels(stats.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.completion_tokens)
        if stats.completion_tokens:
            self.ttft.observe(stats.ttft_s)
        if stats.completion_tokens > 1:
            self.tpot.observe(stats.decode_s / (stats.completion_tokens - 1))


class RequestMetricsMiddleware:
    """Counts every HTTP request by route template and status (pure ASGI: streaming passes through
    untouched), and is the last guard: an exception that escapes the app is logged and answered with an
    OpenAI-style 500, counted like any other response."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            if status:  # the response had started: all we can do is end the connection
                raise
            status = 500
            await send_internal_error(send)
        finally:
            route = scope.get("route")
            # Route templates (/v1/sessions/{session_id}), never raw paths: ids would explode the labels.
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            if status >= 500:
                self.metrics.errors.labels("server_error").inc()
            log.debug("%s %s -> %d in %.3f s", scope["method"], scope["path"], status,
                      time.perf_counter() - t0)


async def send_internal_error(send: Send) -> None:
    body = json.dumps({"error": {"message": "internal server error (see the server log)",
                                 "type": "server_error", "param": None, "code": None}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})
