"""Prometheus metrics of one worker process, served on `VLMQ_METRICS_PORT` (`/metrics`, worker/health.py).

Each `Metrics` has its own registry, so tests and several engines in one process never share counters.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from producer.core.jobs import JobResult

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The worker's counters, histograms and gauges (documented in docs/metrics.md)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter("vlmq_jobs", "Jobs finished, by status and error code", ["status", "code"], registry=r)
        self.retries = Counter("vlmq_job_retries", "Retries scheduled after a retryable error", ["code"], registry=r)
        self.queue_wait = Histogram(
            "vlmq_queue_wait_seconds", "From submission to a task thread starting the job", buckets=SECONDS, registry=r
        )
        self.media_seconds = Histogram(
            "vlmq_media_seconds", "Fetch, decode and prepare of one job's media", buckets=SECONDS, registry=r
        )
        self.batch_size = Histogram(
            "vlmq_batch_size",
            "Jobs per model call (hf: one generate; vllm: one engine step)",
            buckets=BATCH_SIZES,
            registry=r,
        )
        self.model_seconds = Histogram(
            "vlmq_model_seconds", "Wall time of one batch in the model (generate)", buckets=SECONDS, registry=r
        )
        self.model_busy = Counter(
            "vlmq_model_busy_seconds", "Time the model loop spent running batches; rate() < 1 is idle", registry=r
        )
        self.items = Counter("vlmq_model_items", "Items that went through the model", registry=r)
        self.preprocess_restarts = Counter(
            "vlmq_preprocess_restarts", "Preprocessing processes that died and were replaced", registry=r
        )
        self.model_load_seconds = Gauge("vlmq_model_load_seconds", "Time taken to load the model", registry=r)
        self.ready = Gauge("vlmq_ready", "1 once the model is loaded and the worker consumes jobs", registry=r)
        self.gpu_memory = Gauge("vlmq_gpu_memory_bytes", "Device memory allocated by torch (0 on CPU)", registry=r)
        self.generated_tokens = Counter("vlmq_generated_tokens", "Tokens generated for jobs (useful work)", registry=r)
        self.decode_slots = Counter(
            "vlmq_decode_slots",
            "Token positions the model decoded, padding included; over vlmq_generated_tokens: the padding waste",
            registry=r,
        )
        self.running = Gauge("vlmq_engine_running_requests", "Requests the engine is running now (vllm)", registry=r)
        self.waiting = Gauge("vlmq_engine_waiting_requests", "Requests waiting in the engine's scheduler", registry=r)
        self.kv_cache_usage = Gauge("vlmq_engine_kv_cache_usage", "Share of the KV cache in use, 0 to 1", registry=r)
        self.preemptions = Counter("vlmq_engine_preemptions", "Requests preempted for KV-cache space", registry=r)
        self.decode_compilations = Counter(
            "vlmq_decode_compilations",
            "Static decode shapes built (hf: CUDA graphs captured; on CPU, each shape's buffers). All are built at "
            "start-up, so it stays flat while the worker serves",
            registry=r,
        )
        self.decode_steps = Counter(
            "vlmq_decode_steps", "Decode steps of the hf engine's static loop (one token for every row)", registry=r
        )
        self.decode_seconds = Counter(
            "vlmq_decode_seconds",
            "Wall time of those steps; over vlmq_decode_steps_total: the mean decode step",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "vlmq_time_to_first_token_seconds",
            "From a request reaching the engine to its first token",
            buckets=SECONDS,
            registry=r,
        )

    def finished(self, result: JobResult) -> None:
        self.jobs.labels(result.status, result.error.code if result.error else "").inc()

    def generated(self, tokens: int, slots: int) -> None:
        """`tokens` generated for jobs, at the cost of `slots` decoded positions (equal without padding)."""
        self.generated_tokens.inc(tokens)
        self.decode_slots.inc(slots)

    def decoded(self, steps: int, seconds: float) -> None:
        self.decode_steps.inc(steps)
        self.decode_seconds.inc(seconds)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.model_seconds.observe(seconds)
        self.model_busy.inc(seconds)
        self.items.inc(size)

    def watch_gpu_memory(self, read: Callable[[], float]) -> None:
        self.gpu_memory.set_function(read)
