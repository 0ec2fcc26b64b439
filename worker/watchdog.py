"""Deadlines Python cannot enforce by itself: a hung video decoder, a hung or broken device.

A thread stuck in native code (decord looping on a file that lies about its frames, dmlc/decord#373; a CUDA
kernel that never returns) cannot be interrupted, and with the threads pool Celery's time limits do not apply.
So:

- `call_with_deadline` runs a decode in its own thread and stops waiting at the deadline: the job fails with a
  coded error, and the worker is restarted (the stuck thread cannot be freed);
- `Watchdog` watches the batcher thread: a batch running past its deadline means the device is hung, and only a
  new process helps. It exits at once, leaving its jobs unacknowledged, so Redis redelivers them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# The exit status of a worker that must be restarted (EX_SOFTWARE): systemd, Kubernetes or `vlmq worker --gpus`
# start a new one, with a fresh device context.
EXIT_RESTART = 70


class DeadlinePassed(Exception):
    """The call did not return within its deadline; it is still running in its abandoned thread."""


def call_with_deadline(fn: Callable[[], T], timeout_s: float, name: str) -> T:
    """`fn()`, run in a daemon thread; raises `DeadlinePassed` if it has not returned after `timeout_s`."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise DeadlinePassed(f"{name} did not finish within {timeout_s:g} s")
    if failure:
        raise failure[0]
    return outcome[0]


def exit_for_restart(reason: str) -> None:
    """End the process now, without acknowledging its jobs (they are redelivered), for its supervisor to restart."""
    log.critical("%s: exiting (status %d) so that a new worker process takes over", reason, EXIT_RESTART)
    logging.shutdown()
    os._exit(EXIT_RESTART)


class Watchdog:
    """Calls `on_expire` once if a watched section runs longer than `timeout_s`."""

    def __init__(self, timeout_s: float, on_expire: Callable[[str], None], poll_s: float = 0.5) -> None:
        self.timeout_s = timeout_s
        self.on_expire = on_expire
        self.poll_s = poll_s
        self._started: float | None = None
        self._stop = threading.Event()

    def begin(self) -> None:
        self._started = time.monotonic()

    def end(self) -> None:
        self._started = None

    def age(self) -> float | None:
        """Seconds the watched section has run, or None when none runs."""
        started = self._started
        return None if started is None else time.monotonic() - started

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="vlmq-watchdog", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            started = self._started
            if started is not None and time.monotonic() - started > self.timeout_s:
                self.on_expire(f"a batch has run for more than {self.timeout_s:g} s (VLMQ_BATCH_TIMEOUT_S)")
                return
