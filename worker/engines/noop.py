"""The no-op engine: the checkpoint's real processor, then a fixed text at once. A bench and test seam, not a user
option.

It is chosen only through fault injection (`VLMQ_FAULTS='{"noop_engine": "a fixed text"}'`, see
worker/devtools/faults.py), never by `--engine`: with it a worker does everything it does per job except the model,
which is what bench/overhead.py measures. `prepare` is the hf engine's own (chat template, tokenizer, image and
video processor), so its CPU cost is the real one; only the processor is loaded from the checkpoint, not the
weights. It lives in this package rather than in worker/devtools because `start_engine` selects it: a devtools
module importing the engines back would be an import cycle across layers (tests/unit/test_layering.py).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

import torch

from worker.engines.base import Generated
from worker.engines.hf_model import Prepared, VisionLanguageModel
from worker.metrics import Metrics
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class NoopEngine:
    """`VisionLanguageModel.prepare` without a model; `add` answers `text` at once (see `worker.engines.base`)."""

    def __init__(self, holder: VisionLanguageModel, text: str) -> None:
        self.name = holder.name
        self.max_batch_size = 8
        self.prepare = holder.prepare
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
