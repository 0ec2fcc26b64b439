"""The interface every engine implements, and what it hands back.

An engine owns the model of one worker process: it loads it, turns one job's decoded media and conversation into
a request (`prepare`, in the job's task thread), and runs requests (`add`, which returns at once with a future).
How requests are grouped is the engine's business: the transformers engine micro-batches them; a serving engine
batches continuously. The pipeline (worker/pipeline.py) knows only this interface, so a new engine is one module.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from producer.jobs import Generation


@dataclass
class Generated:
    """The text generated for one job, how many jobs shared its model call, and its token counts."""

    text: str
    batch_size: int
    prompt_tokens: int = 0
    tokens: int = 0
    decode_slots: int = 0  # positions decoded for it, padding included (a static batch decodes to its longest)


class Engine(Protocol):
    """One loaded model and the machinery that runs jobs through it.

    Failures are values, not exceptions, except for a broken device: a job's own failure (out of memory alone,
    a processor error) sets its future's exception to a `VlmqError`; a device that can no longer run anything ends
    the process with status 70 (`worker.watchdog.exit_for_restart`) so its jobs are redelivered elsewhere.
    """

    name: str
    """The model id or path, as results report it."""

    max_batch_size: int
    """Most jobs the engine runs in one model call (the worker keeps twice this many in flight by default)."""

    def prepare(
        self,
        conversation: list[dict[str, Any]],
        images: Sequence[Image.Image],
        videos: Sequence[np.ndarray],
        generation: Generation,
    ) -> Any:
        """One job's request: the checkpoint's chat template over `conversation`, its media, its generation settings.

        Runs in the job's task thread. Raises `InferenceError` when the inputs cannot be prepared.
        """
        ...

    def add(self, job_id: str, request: Any) -> Future[Generated]:
        """Queue a prepared request; the future holds its `Generated`, or its `VlmqError`."""
        ...

    def probe(self) -> None:
        """A minimal model call: raises if the device is broken (readiness and liveness probes)."""
        ...

    def busy_for(self) -> float | None:
        """Seconds the current model call has run, or None when none runs (liveness: a hung device)."""
        ...

    def close(self) -> None:
        """Finish the requests already added, then release the model's threads."""
        ...
