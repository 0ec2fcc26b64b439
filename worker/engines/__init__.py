"""Engines run the model behind one small interface (`worker.engines.base.Engine`); one module per engine.

- `hf`: transformers on dynamic micro-batches, the model card's code path (the reference); on CUDA, greedy jobs
  decode on captured CUDA graphs.
- `vllm`: vLLM's continuous batching (`pip install 'vlmq[vllm]'`), same prompts, frames and decoding.

`VLMQ_ENGINE=auto` picks vllm when it is installed and CUDA is present, else hf. A hook may put another engine in
their place (`Hooks.engine`: vlmq's tests and bench/overhead.py run a no-op engine that way).
"""

from __future__ import annotations

import importlib.util
import logging

from worker.batcher import Incoming
from worker.engines.base import Engine, EngineClass, Generated, Preparation
from worker.hooks import Hooks
from worker.metrics import Metrics
from worker.settings import WorkerSettings

__all__ = ["Engine", "Generated", "choose_engine", "engine_class", "start_engine"]

log = logging.getLogger(__name__)


def choose_engine(settings: WorkerSettings) -> str:
    """The engine a worker with these settings runs: `settings.engine`, with `auto` resolved."""
    if settings.engine != "auto":
        return settings.engine
    if settings.device == "cpu" or importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def engine_class(settings: WorkerSettings, hooks: Hooks) -> EngineClass:
    """The class of the engine this worker runs (imported only here: vllm, torch and transformers load with it)."""
    replaced = hooks.engine()
    if replaced is not None:
        return replaced
    if choose_engine(settings) == "vllm":
        from worker.engines.vllm import VLLMEngine

        return VLLMEngine
    from worker.engines.hf import HFEngine

    return HFEngine


def preparation(settings: WorkerSettings, hooks: Hooks) -> Preparation:
    """What this worker's preprocessing processes need to prepare its engine's requests."""
    return engine_class(settings, hooks).preparation(settings)


def start_engine(
    settings: WorkerSettings,
    metrics: Metrics,
    hooks: Hooks,
    incoming: Incoming | None = None,
) -> Engine:
    """Load the model with the engine the settings name, and start its threads. `incoming`: the jobs on their way to
    the engine (a micro-batcher waits for batch-mates only while there are some)."""
    cls = engine_class(settings, hooks)
    log.info("engine: %s%s", choose_engine(settings), " (VLMQ_ENGINE=auto)" if settings.engine == "auto" else "")
    return cls.start(settings, metrics, hooks, Incoming() if incoming is None else incoming)
