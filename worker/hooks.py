"""Seams where code outside the runtime acts on a worker, as dramatiq's middleware does: the runtime calls a hook at a
named point and never knows who listens. Every hook does nothing here; vlmq's fault injection
(worker/devtools/faults.py) subclasses `Hooks` and is installed by `vlmq worker` only when VLMQ_FAULTS is set.

A `Hooks` object crosses to the preprocessing processes pickled, so a subclass must pickle (plain fields).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class Hooks:
    """The seams of one worker; the defaults do nothing."""

    def message(self, body: bytes) -> None:
        """The consumer holds a message's raw body, before anything decodes it."""

    def job(self, uris: Sequence[str]) -> None:
        """A task thread starts a job (its media URIs), in the engine's process."""

    def preparing(self, uris: Sequence[str]) -> None:
        """A job's media are about to be fetched, decoded and prepared, in the process that does it."""

    def decoding(self, uri: str) -> None:
        """A video is about to be decoded."""

    def loading(self) -> None:
        """The engine is about to load its model."""

    def batch(self, token_counts: Sequence[int]) -> None:
        """A batch (its prompts' token counts) is about to run the model (hf engine); may raise as the model would."""

    def request(self, prompt: str, kill_engine: Callable[[], None]) -> None:
        """A request is about to enter the engine (vllm); `kill_engine` kills its engine core process."""

    def engine(self) -> Any:
        """An engine class to run instead of the configured one (`worker.engines.base.EngineClass`), or None."""
        return None
