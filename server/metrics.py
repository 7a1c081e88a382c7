"""Prometheus metrics at `/metrics` (`--enable_metrics`), with SGLang's names where it has them.

    counters    sglang:prompt_tokens_total, sglang:generation_tokens_total, sglang:cached_tokens_total,
                sglang:num_requests_total, sglang:num_aborted_requests_total,
                sglang:http_responses_total{route, code}           (ours: requests by HTTP status)
    histograms  sglang:time_to_first_token_seconds, sglang:inter_token_latency_seconds,
                sglang:e2e_request_latency_seconds
    gauges      sglang:num_running_reqs, sglang:num_queue_reqs, sglang:token_usage,
                sglang:cache_hit_rate, sglang:num_retracted_reqs    (read from the scheduler per scrape)

Request metrics are observed in the main process as outputs reach each request (so TTFT
and ITL are what a client sees, tokenization and detokenization included); scheduler gauges
come from one StatsReq per scrape. Each server has its own registry (tests start several).
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 60.0, 120.0, 240.0, 400.0)


class Metrics:
    def __init__(self, model_name: str, routes: set[str]):
        r = self.registry = CollectorRegistry()
        self.routes = routes

        def counter(name, doc):
            return Counter(name, doc, ["model_name"], registry=r).labels(model_name)

        def histogram(name, doc):
            return Histogram(name, doc, ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(model_name)

        def gauge(name, doc):
            return Gauge(name, doc, ["model_name"], registry=r).labels(model_name)
        self.prompt_tokens = counter("sglang:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("sglang:generation_tokens", "Number of generation tokens processed.")
        self.cached_tokens = counter("sglang:cached_tokens", "Number of prompt tokens served from the prefix cache.")
        self.requests = counter("sglang:num_requests", "Number of requests processed.")
        self.aborted = counter("sglang:num_aborted_requests", "Number of requests aborted (client or server).")
        self.http = Counter("sglang:http_responses", "HTTP responses by route and status code.",
                            ["route", "code"], registry=r)
        self.ttft = histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.")
        self.itl = histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.")
        self.e2e = histogram("sglang:e2e_request_latency_seconds", "Histogram of end-to-end request latency.")
        self.running = gauge("sglang:num_running_reqs", "The number of running requests.")
        self.queued = gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.")
        self.token_usage = gauge("sglang:token_usage", "Fraction of KV slots held by running requests.")
        self.hit_rate = gauge("sglang:cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.")
        self.retracted = gauge("sglang:num_retracted_reqs", "Retractions since start (KV pool ran out in decode).")
        self.prompt_total = self.cached_total = 0       # for the hit rate

    # ---- per request (called by the TokenizerManager) ----------------------------------
    def on_output(self, state, out) -> None:
        now = time.perf_counter()
        new = len(state.output_ids) - state.metric_tokens
        if new > 0:
            if state.first_token_at is None:
                state.first_token_at = now
                self.ttft.observe(now - state.inp.arrival)
                new -= 1            # the first token is TTFT's; the rest share the gap evenly
            for _ in range(new):
                self.itl.observe((now - state.last_token_at) / new)
            state.metric_tokens, state.last_token_at = len(state.output_ids), now
        if out.finished:
            self.requests.inc()
            self.e2e.observe(now - state.inp.arrival)
            self.prompt_tokens.inc(out.prompt_tokens)
            self.generation_tokens.inc(out.completion_tokens)
            self.cached_tokens.inc(out.cached_tokens)
            self.prompt_total += out.prompt_tokens
            self.cached_total += out.cached_tokens
            if (out.finish_reason or {}).get("type") == "abort":
                self.aborted.inc()

    def on_client_gone(self) -> None:
        self.requests.inc()
        self.aborted.inc()

    # ---- per scrape ---------------------------------------------------------------------
    def render(self, stats: dict | None) -> tuple[bytes, str]:
        if stats:                       # None when the scheduler did not answer: counters still go out
            self.running.set(stats["num_running"])
            self.queued.set(stats["num_waiting"])
            self.token_usage.set(stats["kv_running_slots"] / max(stats["kv_pool_size"], 1))
            self.retracted.set(stats["total_retractions"])
        self.hit_rate.set(self.cached_total / self.prompt_total if self.prompt_total else 0.0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class HttpMetricsMiddleware:
    """Counts responses by route and status; unknown paths count as "other" (bounded labels)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.metrics.routes else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http.labels(route, str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counting_send)
