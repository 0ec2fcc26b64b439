"""The interface every engine implements, and what it hands back.

An engine owns the model of one worker process: it loads it, says how a job's decoded media become its request
(its `Preparation`, built in each preprocessing process, or `prepare` in the engine's own process with
`--preprocess-workers 0`), and runs requests (`add`, which returns at once with a future). How requests are grouped
is the engine's business: the transformers engine micro-batches them; a serving engine batches continuously. The
pipeline (worker/pipeline.py) and the preprocessing (worker/preprocess.py) know only this interface, so a new
engine is one module.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

import numpy as np
import torch
from PIL import Image

from producer.core.jobs import Generation

if TYPE_CHECKING:
    from worker.batcher import Incoming
    from worker.hooks import Hooks
    from worker.metrics import Metrics
    from worker.settings import WorkerSettings

Prepare = Callable[[list[dict[str, Any]], list[Image.Image], list[np.ndarray], Generation], Any]
"""An engine's preparation of one job: its conversation, images, video frames and generation settings in, its
request out; raises `InferenceError` when the inputs cannot be prepared."""


@runtime_checkable
class Shareable(Protocol):
    """A request whose large tensors cross processes in shared memory (`torch.multiprocessing`'s reductions)."""

    def shared(self) -> Self:
        """Ready to be pickled to another process: large tensors as tensors, the rest as plain values."""
        ...

    def restored(self) -> Self:
        """`shared` undone in the receiving process."""
        ...


@dataclass
class Decoded:
    """A job's decoded media and conversation: the request of an engine that prepares in its own process (vllm: its
    processor runs in its front end)."""

    conversation: list[dict[str, Any]]
    images: list[Image.Image]
    videos: list[Any]  # frames: numpy arrays; torch tensors while they cross processes (`shared`)
    generation: Generation

    def shared(self) -> Decoded:
        """The frames as tensors, which cross processes in shared memory."""
        self.videos = [torch.from_numpy(np.ascontiguousarray(v)) for v in self.videos]
        return self

    def restored(self) -> Decoded:
        """`shared` undone on the other side (no copy)."""
        self.videos = [v.numpy() for v in self.videos]
        return self


class Preparation(Protocol):
    """What an engine's preprocessing needs, as a small picklable value: built once in each preprocessing process."""

    def build(self) -> Prepare | None:
        """The function that turns decoded media into the engine's request; None: the request is the `Decoded`."""
        ...


@dataclass(frozen=True)
class DecodedMedia:
    """The preparation of an engine that takes `Decoded` media and prepares them in its own process."""

    def build(self) -> Prepare | None:
        return None


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

    prepare: Prepare | None
    """Its preparation in its own process (`--preprocess-workers 0`: in the job's task thread); None as for
    `DecodedMedia`."""

    def add(self, job_id: str, request: Any) -> Future[Generated]:
        """Queue a request (what its preparation returned); the future holds its `Generated`, or its `VlmqError`."""
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


class EngineClass(Protocol):
    """What starts an engine: the engines' registry (worker/engines/__init__.py) holds these."""

    def preparation(self, settings: WorkerSettings) -> Preparation:
        """What its preprocessing needs, known before the model loads (the pool starts meanwhile)."""
        ...

    def start(self, settings: WorkerSettings, metrics: Metrics, hooks: Hooks, incoming: Incoming) -> Engine:
        """Load the model and start the engine's threads; `incoming`: the jobs on their way to it."""
        ...
