"""The job lifecycle: what happens to a `vlmq.run` message from its start to its one recorded end.

Delivery is at least once (late acks: a worker killed mid-job leaves the message to be redelivered). The decisions
that turn that into one terminal result per job are pure functions here (unit-tested over every case):

- `Start.may_have_finished`, `Start.ended_by`: look for a stored end before running (the S3 result is the commit
  point): a success, or a failure an earlier copy of the same message stored, is returned, not run again;
- `decide`: run the job, or end it `expired` (its `Deadline` passed), `cancelled`, or dead-lettered `worker_lost`
  without running;
- `retry_delay`: exponential backoff with equal jitter.

`Finisher.finish` is how a worker records any ending: producer/core/endings.py's one path (which `Client.cancel` takes
too), plus the worker's metrics.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from celery.utils.time import get_exponential_backoff_interval

from producer.core.endings import Endings
from producer.core.errors import ResultWriteError
from producer.core.jobs import JobResult
from worker.errors import ResultWriteFailed, VlmqError
from worker.metrics import Metrics

log = logging.getLogger(__name__)

Decision = Literal["run", "expired", "cancelled", "dead"]


@dataclass(frozen=True)
class Start:
    """What is known when a job's message starts running."""

    starts: int  # starts counted in the job's current run, this one included
    retries: int  # Celery retries so far
    redelivered: bool  # kombu redelivered the message (its worker died, or it came back after a shutdown)
    succeeded_before: bool  # the ledger says the job id already succeeded
    force: bool = False  # run it again even if a success is stored

    @property
    def crashes(self) -> int:
        """Starts that neither finished nor asked for a retry: its worker died running it."""
        return self.starts - 1 - self.retries

    @property
    def may_have_finished(self) -> bool:
        """Whether an earlier copy may have stored the job's end: a copy redelivered after its worker died between
        writing the result and acknowledging, a resubmitted id that succeeded, or a start more than its retries
        explain (its end was not recorded: Redis was down, and the lost-message recovery sent it again)."""
        return (self.redelivered or self.succeeded_before or self.crashes > 0) and not self.force

    def ended_by(self, stored: JobResult, submitted_at: datetime | None) -> bool:
        """Whether a stored result is this job's end, so that it is returned instead of running the job again.

        A success always is (the S3 result is the commit point). A failure is the end only of the submission it
        was stored for: for a copy of the same message (redelivered, or started more often than its retries
        explain) and stored after that submission; a job submitted again after it failed runs again.
        """
        if stored.ok:
            return True
        same_message = self.redelivered or self.crashes > 0
        return same_message and submitted_at is not None and stored.finished_at >= submitted_at


@dataclass(frozen=True)
class Deadline:
    """When a job stops being worth running: its message's Celery `expires`, and its time to live (`ttl_s`, or
    VLMQ_JOB_TTL_S) counted from its submission (for another client's job, from when a worker first saw it)."""

    expires: datetime | None = None
    submitted_at: datetime | None = None
    ttl_s: float | None = None

    def passed(self, now: datetime) -> str | None:
        """Why the job is too late to run at `now` (the `expired` error's message), or None."""
        if self.expires is not None and self.expires <= now:
            return f"the message's Celery expires ({self.expires.isoformat()}) passed before it started; it was not run"
        if self.submitted_at is not None and self.ttl_s is not None:
            waited = (now - self.submitted_at).total_seconds()
            if waited > self.ttl_s:
                return (
                    f"the job was taken {waited:,.1f} s after it was submitted, past its time to live of "
                    f"{self.ttl_s:g} s (ttl_s or VLMQ_JOB_TTL_S); it was not run. Submit it again if it is still wanted"
                )
        return None


def decide(start: Start, *, max_crashes: int, deadline: Deadline, now: datetime, cancelled: bool) -> Decision:
    """What to do with a valid job that has no stored success: the one place a job's expiry is decided."""
    if deadline.passed(now) is not None:
        return "expired"
    if cancelled:
        return "cancelled"
    if start.crashes >= max_crashes:
        return "dead"
    return "run"


def retries_left(error: VlmqError, retries: int, max_retries: int) -> bool:
    return error.retryable and retries < max_retries


def retry_delay(
    retries: int, backoff_s: int, max_s: int, draw: Callable[[float, float], float] = random.uniform
) -> float:
    """Seconds before retry number `retries + 1`: equal jitter, half the exponential delay fixed and half random.
    Full jitter often draws 0 s, and a store failing fast (a restarting S3 answers in milliseconds) would use up
    every retry in a second."""
    countdown = get_exponential_backoff_interval(factor=backoff_s, retries=retries, maximum=max_s)
    return countdown / 2 + draw(0, countdown / 2)


class Recorder(Protocol):
    def record(self, result: JobResult, job: Any, dead: bool) -> Future[ResultWriteFailed | None]: ...


class Finisher:
    """A worker's way of recording a job's end (producer/core/endings.py, the one path every ending takes), with its
    metrics, and off the engine's process when it can (`recorder`: the preprocessing pool)."""

    def __init__(self, endings: Endings, metrics: Metrics) -> None:
        self.endings = endings
        self.batches = endings.batches
        self.metrics = metrics
        self.recorder: Recorder | None = None  # the preprocessing pool, when the worker has one

    def finish(
        self,
        result: JobResult,
        job: Any,
        *,
        write_s3: bool = True,
        to_backend: bool = False,
        dead: bool = False,
        write_failed: Callable[[ResultWriteFailed], None] = lambda exc: None,
    ) -> None:
        """Record `result` as the end of `job` (`Endings.record`'s arguments) and count it, unless it is a stored
        result (`write_s3=False`), counted when it ran.

        A result a task returns (no `to_backend`) is recorded by a preprocessing process when the worker has them:
        its S3 write and Redis calls are then off the engine's process.
        """
        if write_s3 and not to_backend and self.recorder is not None:
            try:
                failed = self.recorder.record(result, job, dead).result()
            except Exception as exc:  # the pool could not record it (shut down, a process died): record it here
                log.warning("job %s: recording its end here, not in the pool (%s)", result.id, exc)
            else:
                if failed is not None:
                    write_failed(failed)
                    log.error("job %s: %s; its result is in Redis only", result.id, failed.message)
                    self.endings.record(result, job, write_s3=False, dead=dead)  # the rest of it
                self.metrics.finished(result)
                return
        self.record(result, job, write_s3=write_s3, to_backend=to_backend, dead=dead, write_failed=write_failed)
        if write_s3:
            self.metrics.finished(result)

    def record(
        self,
        result: JobResult,
        job: Any,
        *,
        write_s3: bool = True,
        to_backend: bool = False,
        dead: bool = False,
        write_failed: Callable[[ResultWriteFailed], None] = lambda exc: None,
    ) -> None:
        """`Endings.record`, a failed S3 write seen as the job's `ResultWriteFailed` (retryable)."""

        def failed(error: ResultWriteError) -> None:
            write_failed(ResultWriteFailed(str(error)))

        self.endings.record(result, job, write_s3=write_s3, to_backend=to_backend, dead=dead, write_failed=failed)
