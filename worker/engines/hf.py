"""The transformers engine: the model card's own code path, on dynamic micro-batches.

Task threads `prepare` their jobs (chat template, tokenizer, image/video processor); `add` hands the prepared
inputs to the batcher, whose thread stacks jobs with equal batch keys and calls `model.generate` once per batch.
A watchdog restarts the process when a batch runs past `VLMQ_BATCH_TIMEOUT_S` (a hung device).
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from worker.batcher import Batcher
from worker.devtools.faults import Faults
from worker.engines.base import Generated
from worker.engines.hf_model import Prepared, VisionLanguageModel
from worker.errors import DeviceFailed
from worker.metrics import Metrics
from worker.settings import WorkerSettings
from worker.watchdog import Watchdog, exit_for_restart


class HFEngine:
    """`VisionLanguageModel` behind the batcher and the watchdog (see `worker.engines.base.Engine`)."""

    def __init__(self, model: VisionLanguageModel, settings: WorkerSettings, metrics: Metrics) -> None:
        self.model = model
        self.name = model.name
        self.prepare = model.prepare  # runs in the task threads, each with its own copy of the processor
        self.metrics = metrics
        self.watchdog = Watchdog(settings.batch_timeout_s, exit_for_restart)
        self.batcher: Batcher[Prepared, Generated] = Batcher(
            self._run_batch, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000
        )

    @classmethod
    def start(cls, settings: WorkerSettings, metrics: Metrics, faults: Faults | None = None) -> HFEngine:
        """Load the model (once per process), then start the batcher and watchdog threads."""
        started = time.perf_counter()
        model = VisionLanguageModel.load(
            settings.model,
            settings.device,
            settings.torch_threads,
            dtype=settings.dtype,
            quantization=settings.quantization,
            attn_implementation=settings.attn_implementation,
        )
        model.faults = faults
        metrics.model_load_seconds.set(time.perf_counter() - started)
        metrics.watch_gpu_memory(model.memory_allocated)
        engine = cls(model, settings, metrics)
        engine.batcher.start()
        engine.watchdog.start()
        return engine

    def add(self, job_id: str, request: Prepared) -> Future[Generated]:
        return self.batcher.submit(request, request.batch_key(job_id))

    def probe(self) -> None:
        self.model.probe()

    def busy_for(self) -> float | None:
        return self.watchdog.age()

    def close(self) -> None:
        self.watchdog.stop()
        self.batcher.close()

    def _run_batch(self, items: list[Prepared]) -> list[Generated | BaseException]:
        started = time.perf_counter()
        self.watchdog.begin()
        try:
            outcomes = self.model.generate_safely(items)
        except DeviceFailed as exc:
            exit_for_restart(f"the device failed ({exc}); nothing more can run on it in this process")
            raise
        finally:
            self.watchdog.end()
        self.metrics.batch(len(items), time.perf_counter() - started)
        done = [o for o in outcomes if isinstance(o, Generated)]
        self.metrics.generated(sum(g.tokens for g in done), sum(g.decode_slots for g in done))
        return outcomes
