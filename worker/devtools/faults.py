"""Fault injection for the reliability tests, off unless `VLMQ_FAULTS` is set (never set it in production).

`vlmq worker` installs `FaultHooks` (the runtime's seams, worker/hooks.py) only when VLMQ_FAULTS is set; no runtime
module imports this one.

`VLMQ_FAULTS` is JSON, e.g. `{"crash_on": "poison", "oom_above_batch": 2, "oom_over_tokens": 900}`:

- `crash_on`: a job with a media URI containing this string kills its worker process with SIGKILL when it
  starts, as a decoder or driver fault would;
- `preprocess_crash_on`: ... kills the process preparing it (a preprocessing process; the worker itself with
  `--preprocess-workers 0`) with SIGKILL, as a crashing decoder would;
- `slow_prepare_s`: preparing each job takes this much longer (to catch a preprocessing process holding jobs);
- `slow_batch_s`: each batch takes this much longer in the engine (a long video batch: the jobs behind it wait);
- `oom_above_batch`: `generate` raises torch's out-of-memory error for batches larger than this;
- `oom_over_tokens`: ... and for any batch holding an item of more than this many input tokens, even alone;
- `device_error_over_tokens`: `generate` raises a sticky CUDA error (torch.AcceleratorError) for such a batch;
- `hang_over_tokens`: `generate` never returns for such a batch, as a hung kernel would;
- `decode_hang_on`: decoding a video whose URI contains this string never returns;
- `load_delay_s`: loading the model takes this much longer (to observe a worker that is not ready yet);
- `crash_on_message`: a message whose raw body contains this string kills the worker with SIGKILL while its
  consumer reads it, before any job starts (a message that crashes the consumer itself);
- `wedge_on_message`: ... makes the consumer block for ever instead (a consumer that stopped consuming);
- `kill_engine_on`: a job whose prompt contains this string kills the vllm engine's core process (SIGKILL), as a
  CUDA crash inside it would;
- `noop_engine`: the worker runs the no-op engine instead of a model (worker/devtools/noop_engine.py): the
  checkpoint's real processor, then this fixed text for every job at once. For bench/overhead.py and tests of the
  per-job machinery.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from worker.hooks import Hooks


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    crash_on: str | None = None
    preprocess_crash_on: str | None = None
    slow_prepare_s: float | None = None
    slow_batch_s: float | None = None
    oom_above_batch: int | None = None
    oom_over_tokens: int | None = None
    device_error_over_tokens: int | None = None
    hang_over_tokens: int | None = None
    decode_hang_on: str | None = None
    load_delay_s: float | None = None
    crash_on_message: str | None = None
    wedge_on_message: str | None = None
    kill_engine_on: str | None = None
    noop_engine: str | None = None

    @classmethod
    def parse(cls, value: str | None) -> Faults | None:
        """The faults of a `VLMQ_FAULTS` JSON string; None when unset."""
        return cls.model_validate_json(value) if value else None


class FaultHooks(Hooks):
    """The runtime's seams (worker/hooks.py) acting out `Faults`."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    def message(self, body: bytes) -> None:
        f = self.faults
        if f.crash_on_message and f.crash_on_message.encode() in body:
            os.kill(os.getpid(), signal.SIGKILL)
        if f.wedge_on_message and f.wedge_on_message.encode() in body:
            threading.Event().wait()

    def job(self, uris: Sequence[str]) -> None:
        if self.faults.crash_on and any(self.faults.crash_on in uri for uri in uris):
            os.kill(os.getpid(), signal.SIGKILL)

    def preparing(self, uris: Sequence[str]) -> None:
        f = self.faults
        if f.preprocess_crash_on and any(f.preprocess_crash_on in uri for uri in uris):
            os.kill(os.getpid(), signal.SIGKILL)
        if f.slow_prepare_s:
            time.sleep(f.slow_prepare_s)

    def decoding(self, uri: str) -> None:
        if self.faults.decode_hang_on and self.faults.decode_hang_on in uri:
            threading.Event().wait()

    def loading(self) -> None:
        if self.faults.load_delay_s:
            time.sleep(self.faults.load_delay_s)

    def batch(self, token_counts: Sequence[int]) -> None:
        import torch

        f = self.faults
        if f.slow_batch_s:
            time.sleep(f.slow_batch_s)
        if f.oom_above_batch is not None and len(token_counts) > f.oom_above_batch:
            raise torch.OutOfMemoryError(f"injected: batch of {len(token_counts)} > {f.oom_above_batch}")
        if f.oom_over_tokens is not None and max(token_counts) > f.oom_over_tokens:
            raise torch.OutOfMemoryError(f"injected: an item of more than {f.oom_over_tokens} tokens")
        if f.device_error_over_tokens is not None and max(token_counts) > f.device_error_over_tokens:
            raise torch.AcceleratorError("injected: CUDA error: an illegal memory access was encountered")
        if f.hang_over_tokens is not None and max(token_counts) > f.hang_over_tokens:
            threading.Event().wait()

    def request(self, prompt: str, kill_engine: Callable[[], None]) -> None:
        if self.faults.kill_engine_on and self.faults.kill_engine_on in prompt:
            kill_engine()

    def engine(self) -> Any:
        if self.faults.noop_engine is None:
            return None
        from worker.devtools.noop_engine import Noop

        return Noop(self.faults.noop_engine)


def hooks_for(faults: str | None) -> Hooks:
    """The hooks a worker runs with: fault injection when `VLMQ_FAULTS` (`faults`) is set, else none."""
    parsed = Faults.parse(faults)
    return FaultHooks(parsed) if parsed is not None else Hooks()
