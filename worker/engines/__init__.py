"""Engines run the model behind one small interface (`worker.engines.base.Engine`); one module per engine.

- `hf`: transformers' `generate` on dynamic micro-batches, the model card's code path (the reference).
- `vllm`: vLLM's continuous batching (`pip install 'vlmq[vllm]'`), same prompts, frames and decoding.

`VLMQ_ENGINE=auto` picks vllm when it is installed and CUDA is present, else hf. A third, `noop` (the real
processor, no model), is a bench and test seam chosen only through `VLMQ_FAULTS` (worker/engines/noop.py).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

from worker.devtools.faults import Faults
from worker.engines.base import Engine, Generated
from worker.metrics import Metrics
from worker.settings import WorkerSettings

__all__ = ["Engine", "Generated", "choose_engine", "start_engine"]

log = logging.getLogger(__name__)


def choose_engine(settings: WorkerSettings) -> str:
    """The engine a worker with these settings runs: `settings.engine`, with `auto` resolved."""
    if settings.engine != "auto":
        return settings.engine
    if settings.device == "cpu" or importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def start_engine(
    settings: WorkerSettings,
    metrics: Metrics,
    faults: Faults | None = None,
    more_coming: Callable[[], bool] = lambda: True,
) -> Engine:
    """Load the model with the engine the settings name, and start its threads. `more_coming`: whether jobs are on
    their way to the engine (a micro-batcher waits for batch-mates only then)."""
    if faults is not None and faults.noop_engine is not None:  # bench/overhead.py and tests: no model at all
        from worker.engines.noop import NoopEngine

        return NoopEngine.start(settings, metrics, faults.noop_engine)
    name = choose_engine(settings)
    log.info("engine: %s%s", name, " (VLMQ_ENGINE=auto)" if settings.engine == "auto" else "")
    if name == "vllm":
        from worker.engines.vllm import VLLMEngine  # imports vLLM: only where it is installed and asked for

        return VLLMEngine.start(settings, metrics, faults)
    from worker.engines.hf import HFEngine  # imports torch and transformers: only in processes that run a model

    return HFEngine.start(settings, metrics, faults, more_coming)
