"""vLLM's per-step statistics into the worker's Prometheus metrics (imported only where vLLM is installed).

vLLM hands every stat logger a `SchedulerStats` (running and waiting requests, KV-cache use) and an
`IterationStats` (tokens generated, time to first token, preemptions) after each engine step; their fields are not a
stable interface upstream (vllm/v1/metrics/stats.py), so they are read here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from worker.metrics import Metrics


class StatsToMetrics(StatLoggerBase):
    """A vLLM stat logger that updates `Metrics` and tells the engine it stepped (`stepped(running requests)`)."""

    def __init__(self, vllm_config: Any, engine_index: int, metrics: Metrics, stepped: Callable[[int], None]) -> None:
        self.metrics = metrics
        self.stepped = stepped

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.metrics.running.set(scheduler_stats.num_running_reqs)
            self.metrics.waiting.set(scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs)
            self.metrics.kv_cache_usage.set(scheduler_stats.kv_cache_usage)
            if scheduler_stats.num_running_reqs:
                self.metrics.batch_size.observe(scheduler_stats.num_running_reqs)  # one engine step
            self.stepped(scheduler_stats.num_running_reqs)
        if iteration_stats is not None:
            self.metrics.preemptions.inc(iteration_stats.num_preempted_reqs)
            for seconds in iteration_stats.time_to_first_tokens_iter:
                self.metrics.time_to_first_token.observe(seconds)

    def log_engine_initialized(self) -> None:
        pass
