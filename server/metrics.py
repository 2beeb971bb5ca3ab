"""Prometheus metrics (the only prometheus_client import): requests, tokens, latencies, engine steps, memory,
connections; and vLLM's metric contract (the `vllm:` names routers and llm-d read), README "Metrics"."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from engine.request import EngineInfo, StepStats

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_TPF = (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
# What server/connections.py closes (or refuses) a connection for.
CONNECTION_LIMITS = ("header_timeout", "body_timeout", "keep_alive_timeout", "send_timeout", "max_connections",
                     "max_connections_per_client")  # fmt: skip
# vLLM's finished_reason values that mean a request was served (request_success_total).
FINISHED_REASONS = ("stop", "length")


class VllmNames(Collector):
    """Each metric under its vLLM names too, labelled model_name and engine as vLLM's are: a second view of the same
    collector at scrape time, so every observation is made once and both names always agree."""

    def __init__(self, names: dict[str, MetricWrapperBase], labels: dict[str, str]) -> None:
        self.names, self.labels = names, labels  # vLLM's name -> the metric observed

    def collect(self) -> Iterator[Metric]:
        for name, source in self.names.items():
            for family in source.collect():
                metric = Metric(name, family.documentation, family.type)
                metric.samples = [sample._replace(name=name + sample.name[len(family.name):],
                                                  labels=self.labels | sample.labels)
                                  for sample in family.samples]  # fmt: skip
                yield metric


class Metrics:
    """One registry per app, so that tests can build several apps in one process."""

    def __init__(self, model_name: str) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "dgserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry
        )
        self.prompt_tokens = Counter("dgserve_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generation_tokens = Counter("dgserve_generation_tokens", "Tokens generated", registry=registry)
        self.tokens_per_second = Gauge(
            "dgserve_generation_tokens_per_second", "Generated tokens per second over the last 10 s", registry=registry
        )
        self.time_to_first_token = Histogram(
            "dgserve_time_to_first_token_seconds", "Arrival to the first output token (a settled prefix or a block)",
            buckets=_LATENCY, registry=registry,
        )  # fmt: skip
        self.time_to_first_block = Histogram(
            "dgserve_time_to_first_block_seconds", "Arrival to first committed block", buckets=_LATENCY,
            registry=registry,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            "dgserve_e2e_request_latency_seconds", "Arrival to finish", buckets=_LATENCY, registry=registry
        )
        self.step_latency = Histogram(
            "dgserve_denoise_step_seconds", "One engine iteration: encode, decoder forward and sampler",
            buckets=_STEP, registry=registry,
        )  # fmt: skip
        self.steps_per_canvas = Histogram(
            "dgserve_denoise_steps_per_canvas", "Denoising steps a canvas took", buckets=_STEPS, registry=registry
        )
        self.tokens_per_forward = Histogram(
            "dgserve_tokens_per_forward", "Per request: output tokens per denoising forward", buckets=_TPF,
            registry=registry,
        )  # fmt: skip
        self.running = Gauge("dgserve_num_requests_running", "Sequences being denoised", registry=registry)
        self.waiting = Gauge("dgserve_num_requests_waiting", "Sequences waiting for admission", registry=registry)
        self.kv_used = Gauge("dgserve_kv_cache_used_bytes", "KV memory charged to sequences", registry=registry)
        self.kv_budget = Gauge("dgserve_kv_cache_budget_bytes", "KV memory budget", registry=registry)
        self.eager_buckets = Gauge(
            "dgserve_eager_step_buckets", "Step buckets (ROWSxPAGES) that run eager: their compile or capture failed",
            ["bucket"], registry=registry,
        )  # fmt: skip
        # The prefix cache (README "Prefix caching"): hit rate = rate(hits) / rate(queries), both in prompt tokens.
        self.prefix_queries = Counter(
            "dgserve_prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache at admission",
            registry=registry,
        )  # fmt: skip
        self.prefix_hits = Counter(
            "dgserve_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache (read, not encoded)",
            registry=registry,
        )  # fmt: skip
        self.prefix_pages = Gauge(
            "dgserve_prefix_cache_pages",
            "KV pages the prefix cache holds (in use by requests or not)",
            registry=registry,
        )
        self.prefix_evictions = Counter(
            "dgserve_prefix_cache_evictions", "KV pages evicted from the prefix cache to make room", registry=registry
        )
        self.prefix_enabled = Gauge(
            "dgserve_prefix_cache_enabled", "1 if prompt pages are shared between requests (prefix caching)",
            registry=registry,
        )  # fmt: skip
        self.prefix_capacity = Gauge(
            "dgserve_prefix_cache_capacity_bytes", "KV memory the prefix cache may hold: the whole full-layer pool "
            "when no request uses it, plus the store of its pages' sliding-layer KV", registry=registry,
        )  # fmt: skip
        self.capture_failures = Gauge(
            "dgserve_graph_capture_failures", "Step buckets whose compile or CUDA-graph capture failed at start",
            registry=registry,
        )  # fmt: skip
        self.open_connections = Gauge("dgserve_open_connections", "HTTP connections open", registry=registry)
        self.connections_closed = Counter(
            "dgserve_connections_closed", "Connections closed or refused by a limit", ["limit"], registry=registry
        )
        for limit in CONNECTION_LIMITS:
            self.connections_closed.labels(limit=limit)
        self.stream_queued_events = Gauge(
            "dgserve_stream_queued_events", "Engine events waiting for their responses to send them", registry=registry
        )
        self.drafts_dropped = Counter(
            "dgserve_stream_drafts_dropped", "Drafts replaced by a newer one before a slow client got them",
            registry=registry,
        )  # fmt: skip
        info = Gauge("dgserve_model_info", "The served model", ["model_name"], registry=registry)
        info.labels(model_name=model_name).set(1)
        # vLLM's metric contract (README "Metrics"): what dgserve measures as vLLM does is exported again under vLLM's
        # name by VllmNames; what only vLLM names is measured under that name alone.
        self._vllm = {"model_name": model_name, "engine": "0"}  # vLLM labels each engine core; dgserve has one
        labels = list(self._vllm)
        # Not registered: exported only under its two vLLM names.
        self.kv_usage = Gauge("kv_cache_usage_perc", "KV-cache usage: the fraction of KV pages in use (1 = full)",
                              registry=None)  # fmt: skip
        self.request_success = Counter(
            "vllm:request_success", "Choices served to their end, by finish reason", [*labels, "finished_reason"],
            registry=registry,
        )  # fmt: skip
        for reason in FINISHED_REASONS:
            self.request_success.labels(**self._vllm, finished_reason=reason)
        self._cache_config = Gauge(
            "vllm:cache_config_info", "The KV cache's shape: block_size tokens per page, num_gpu_blocks pages",
            [*labels, "block_size", "num_gpu_blocks"], registry=registry,
        )  # fmt: skip
        registry.register(VllmNames({
            "vllm:num_requests_running": self.running,
            "vllm:num_requests_waiting": self.waiting,
            "vllm:kv_cache_usage_perc": self.kv_usage,
            "vllm:gpu_cache_usage_perc": self.kv_usage,  # the older name, still read by vLLM's production-stack router
            "vllm:prompt_tokens": self.prompt_tokens,
            "vllm:generation_tokens": self.generation_tokens,
            "vllm:time_to_first_token_seconds": self.time_to_first_token,
            "vllm:e2e_request_latency_seconds": self.e2e_latency,
            "vllm:prefix_cache_queries": self.prefix_queries,
            "vllm:prefix_cache_hits": self.prefix_hits,
        }, self._vllm))  # fmt: skip
        self._page_bytes = 0  # the KV page size, from on_start
        self._num_pages = 1  # the KV pool's pages, from on_start
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def on_start(self, info: EngineInfo) -> None:
        """Called once the engine is built."""
        self.kv_budget.set(info.kv_budget_bytes)
        self._page_bytes, self._num_pages = info.kv_page_bytes, info.kv_num_pages
        self._cache_config.labels(**self._vllm, block_size=str(info.kv_page_tokens),
                                  num_gpu_blocks=str(info.kv_num_pages)).set(1)  # fmt: skip
        self.prefix_enabled.set(info.prefix_caching)
        self.prefix_capacity.set(info.prefix_cache_bytes)
        self.capture_failures.set(len(info.eager_buckets))
        for bucket in info.eager_buckets:
            self.eager_buckets.labels(bucket=bucket).set(1)

    def on_step(self, stats: StepStats) -> None:
        """Called by the engine thread after every iteration."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_used.set(stats.kv_pages_used * self._page_bytes)
        self.kv_usage.set(stats.kv_pages_used / self._num_pages)
        if stats.num_denoise_rows or stats.num_encode_tokens:
            self.step_latency.observe(stats.encode_s + stats.denoise_s)
        self.prefix_queries.inc(stats.prefix_query_tokens)
        self.prefix_hits.inc(stats.prefix_hit_tokens)
        self.prefix_pages.set(stats.prefix_cached_pages)
        self.prefix_evictions.inc(stats.prefix_evictions)
        self._count_tokens(stats.num_output_tokens)

    def on_finish(self, finish_reason: str) -> None:
        """A choice served to its end, with its API's finish reason."""
        reason = "stop" if finish_reason == "tool_calls" else finish_reason  # vLLM's reasons are the engine's
        self.request_success.labels(**self._vllm, finished_reason=reason).inc()

    def _count_tokens(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            span = max(now - self._recent[0][0], 1.0)
            self.tokens_per_second.set(sum(t for _, t in self._recent) / span)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
