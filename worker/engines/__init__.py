"""Engines run the model behind one small interface (`worker.engines.base.Engine`); one module per engine.

- `hf`: transformers' `generate` on dynamic micro-batches, the model card's code path (the reference).
"""

from __future__ import annotations

from worker.devtools.faults import Faults
from worker.engines.base import Engine, Generated
from worker.metrics import Metrics
from worker.settings import WorkerSettings

__all__ = ["Engine", "Generated", "start_engine"]


def start_engine(settings: WorkerSettings, metrics: Metrics, faults: Faults | None = None) -> Engine:
    """Load the model with the engine the settings name, and start its threads."""
    from worker.engines.hf import HFEngine  # imports torch and transformers: only in processes that run a model

    return HFEngine.start(settings, metrics, faults)
