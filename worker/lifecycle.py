"""The job lifecycle: what happens to a `vlmq.run` message from its start to its one recorded end.

Delivery is at least once (late acks: a worker killed mid-job leaves the message to be redelivered). The decisions
that turn that into one terminal result per job are pure functions here (unit-tested over every case):

- `Start.may_have_finished`: look for a stored success before running (the S3 result is the commit point);
- `decide`: run the job, or end it `expired`, `cancelled`, or dead-lettered `worker_lost` without running;
- `retry_delay`: exponential backoff with equal jitter.

`Finisher.finish` is the one way any ending is recorded. The endings differ on purpose:

| ending    | S3 write | Celery backend        | metrics | dead letters        | ledger + batch count |
|-----------|----------|-----------------------|---------|---------------------|----------------------|
| `ran`     | yes      | the task returns it   | yes     | if retries ran out  | yes                  |
| `stored`  | no: it is the stored result | returned | no: counted when it ran | no  | yes                  |
| `refused` | yes      | stored here (no task) | yes     | if `worker_lost`    | yes                  |
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import redis
from celery.utils.time import get_exponential_backoff_interval

from producer.batch import BatchStore, JobState
from producer.errors import ResultWriteError
from producer.jobs import JobResult
from producer.ledger import Ledger
from producer.results import ResultStore
from worker.errors import ResultWriteFailed, VlmqError
from worker.metrics import Metrics

log = logging.getLogger(__name__)

Decision = Literal["run", "expired", "cancelled", "dead"]
Ending = Literal["ran", "stored", "refused"]


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
        """Whether an earlier copy may have stored a success: a copy redelivered after its worker died between
        writing the result and acknowledging, a resubmitted id that succeeded, or a start more than its retries
        explain (its end was not recorded: Redis was down, and the lost-message recovery sent it again)."""
        return (self.redelivered or self.succeeded_before or self.crashes > 0) and not self.force


def decide(start: Start, *, max_crashes: int, expired: bool, cancelled: bool) -> Decision:
    """What to do with a valid job that has no stored success."""
    if expired:
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
    """Records a job's end, whichever way it ended (see the module's table)."""

    def __init__(
        self,
        results: ResultStore,
        ledger: Ledger,
        metrics: Metrics,
        webhook_secret: str | None = None,
        backend: Any = None,
    ) -> None:
        self.results = results
        self.ledger = ledger
        self.batches = BatchStore(ledger.redis, ledger.keys)
        self.metrics = metrics
        self.webhook_secret = webhook_secret
        self.backend = backend  # Celery's result backend, for refusals
        self.recorder: Recorder | None = None  # the preprocessing pool, when the worker has one

    def finish(
        self,
        result: JobResult,
        job: Any,
        ending: Ending,
        *,
        dead: bool = False,
        write_failed: Callable[[ResultWriteFailed], None] = lambda exc: None,
    ) -> None:
        """Record `result` as the end of `job` (its JSON, for the dead letters and its batch's count).

        `write_failed` sees an S3 write that failed before anything else is recorded (it may raise Celery's Retry);
        if it returns, the result stays in Redis only. A job that ran is recorded by a preprocessing process when
        the worker has them (`recorder`): its S3 write and Redis calls are then off the engine's process.
        """
        if ending == "ran" and self.recorder is not None:
            try:
                failed = self.recorder.record(result, job, dead).result()
            except Exception as exc:  # the pool could not record it (shut down, a process died): record it here
                log.warning("job %s: recording its end here, not in the pool (%s)", result.id, exc)
            else:
                if failed is not None:
                    write_failed(failed)
                    log.error("job %s: %s; its result is in Redis only", result.id, failed.message)
                    self.record(result, job, "stored", dead=dead)  # the rest of it, without the S3 write
                self.metrics.finished(result)
                return
        self.record(result, job, ending, dead=dead, write_failed=write_failed)
        if ending != "stored":
            self.metrics.finished(result)

    def record(
        self,
        result: JobResult,
        job: Any,
        ending: Ending,
        *,
        dead: bool = False,
        write_failed: Callable[[ResultWriteFailed], None] = lambda exc: None,
    ) -> None:
        """`finish` without the metrics (in a preprocessing process, whose metrics nobody reads)."""
        if ending != "stored":
            try:
                self.results.write(result)
            except ResultWriteError as error:  # the store's error; the job's is `result_write_failed` (retryable)
                exc = ResultWriteFailed(str(error))
                write_failed(exc)
                log.error("job %s: %s; its result is in Redis only", result.id, exc.message)
        if ending == "refused" and self.backend is not None:
            self.backend.store_result(result.id, result.model_dump(mode="json"), "SUCCESS")
        if dead:
            self.ledger.dead_letter(job if isinstance(job, dict) else {}, result)
        self.ledger.record_finished(result)
        self.count_in_batch(job, result)

    def count_in_batch(self, job: Any, result: JobResult) -> None:
        """Count the job's end in its batch (if it has one); the call that ends the batch announces it."""
        batch = job.get("batch") if isinstance(job, dict) else None
        if not isinstance(batch, str):
            return
        code = result.error.code if result.error else None
        state: JobState = "succeeded" if result.ok else "cancelled" if code == "cancelled" else "failed"
        try:
            if self.batches.record_finished(batch, result.id, state, job if state == "failed" else None):
                self.batches.announce(batch, self.webhook_secret)
        except redis.RedisError as exc:
            log.error("job %s: could not count its end in batch %s (%s)", result.id, batch, exc)
