"""Deadlines on native code: a call that never returns is abandoned; which errors mean the device is gone."""

from __future__ import annotations

import threading

import pytest
import torch

from worker.engines.hf_load import device_failed
from worker.watchdog import DeadlinePassed, Watchdog, call_with_deadline


def test_call_with_deadline_returns_the_value_or_the_error_of_a_call_that_finishes() -> None:
    assert call_with_deadline(lambda: 42, 5, "answer") == 42
    with pytest.raises(KeyError, match="missing"):
        call_with_deadline(lambda: {}["missing"], 5, "lookup")


def test_call_with_deadline_gives_up_on_a_call_that_never_returns() -> None:
    release = threading.Event()
    with pytest.raises(DeadlinePassed, match=r"stuck did not finish within 0\.2 s"):
        call_with_deadline(release.wait, 0.2, "stuck")
    release.set()


def test_the_watchdog_fires_once_for_a_section_past_its_deadline_and_never_for_one_that_ended() -> None:
    fired: list[str] = []
    done = threading.Event()
    watchdog = Watchdog(0.2, lambda reason: (fired.append(reason), done.set()), poll_s=0.01)
    thread = watchdog.start()
    watchdog.begin()
    watchdog.end()
    watchdog.begin()
    assert done.wait(10)
    thread.join(10)
    assert fired == ["a batch has run for more than 0.2 s (VLMQ_BATCH_TIMEOUT_S)"]


@pytest.mark.parametrize(
    ("error", "fatal"),
    [
        (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("shape '[1, 2]' is invalid for input of size 3"), False),
        (ValueError("CUDA error in a message that is not a RuntimeError"), False),
    ],
)
def test_only_cuda_errors_other_than_out_of_memory_mean_the_device_is_gone(error: Exception, fatal: bool) -> None:
    assert device_failed(error) is fatal
