"""The no-op engine: the checkpoint's real processor, then a fixed text at once. A bench and test seam, not a user
option.

It is chosen only through fault injection (`VLMQ_FAULTS='{"noop_engine": "a fixed text"}'`, see
worker/devtools/faults.py, whose hooks put it in the configured engine's place), never by `--engine`: with it a
worker does everything it does per job except the model, which is what bench/overhead.py measures. Its preparation
is the hf engine's own (chat template, tokenizer, image and video processor), so its CPU cost is the real one; only
the processor is loaded from the checkpoint, not the weights.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from worker.batcher import Incoming
from worker.engines.base import Generated, Prepare
from worker.engines.hf_model import Prepared, ProcessorPreparation, VisionLanguageModel
from worker.hooks import Hooks
from worker.metrics import Metrics
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class NoopEngine:
    """`VisionLanguageModel.prepare` without a model; `add` answers `text` at once (see `worker.engines.base`)."""

    def __init__(self, holder: VisionLanguageModel, text: str) -> None:
        self.name = holder.name
        self.max_batch_size = 8
        self.prepare: Prepare | None = holder.prepare
        self.text = text

    @classmethod
    def start(cls, settings: WorkerSettings, metrics: Metrics, text: str) -> NoopEngine:
        """Load the checkpoint's processor (no weights)."""
        started = time.perf_counter()
        # The worker this stands in for feeds a GPU, where the hf engine runs one torch thread per operation
        # (VLMQ_TORCH_THREADS' default with CUDA); the processor's torch ops run under the same setting here.
        torch.set_num_threads(settings.torch_threads or 1)
        holder = VisionLanguageModel.processor_only(settings.model)
        metrics.model_load_seconds.set(time.perf_counter() - started)
        log.warning("engine: noop (VLMQ_FAULTS noop_engine): no model, every job answers %r", text)
        return cls(holder, text)

    def add(self, job_id: str, request: Prepared) -> Future[Generated]:
        done: Future[Generated] = Future()
        done.set_result(Generated(self.text, batch_size=1, prompt_tokens=request.num_tokens))
        return done

    def probe(self) -> None:
        return None

    def busy_for(self) -> float | None:
        return None

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class Noop:
    """The no-op engine as an engine class (`worker.engines.base.EngineClass`), with its fixed text."""

    text: str

    def preparation(self, settings: WorkerSettings) -> ProcessorPreparation:
        return ProcessorPreparation(settings.model)

    def start(self, settings: WorkerSettings, metrics: Metrics, hooks: Hooks, incoming: Incoming) -> NoopEngine:
        return NoopEngine.start(settings, metrics, self.text)
