"""A job's end recorded, whoever ends it: a worker that ran or refused it, or a producer that took its queued message
back (`Client.cancel`). One path, so every ending reaches the same places and a batch learns of its last job's end
however that job ended (its count, then the announcement of the batch's end: webhook, `batch-events`).

| how the job ended                            | S3 result       | Celery's backend      | ledger, batch count |
|----------------------------------------------|-----------------|-----------------------|---------------------|
| it ran (a task returns its result to Celery) | written         | by the task           | yes                 |
| a copy found its stored success              | no: it is that  | by the task           | yes                 |
| refused by a worker's gate, or cancelled     | written         | stored here (no task) | yes                 |

A job whose retries ran out, or that workers died running, is also kept in its queue's dead letters (`dead`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis

from producer.core.batches import BatchStore, JobState
from producer.core.errors import ResultWriteError
from producer.core.jobs import JobResult
from producer.core.ledger import Ledger
from producer.core.results import ResultStore

log = logging.getLogger(__name__)


class Endings:
    """Records jobs' ends in the result store, Celery's backend, the ledger and their batches (see the table)."""

    def __init__(
        self,
        results: ResultStore,
        ledger: Ledger,
        webhook_secret: str | None = None,
        backend: Any = None,
    ) -> None:
        self.results = results
        self.ledger = ledger
        self.batches = BatchStore(ledger.redis, ledger.keys)
        self.webhook_secret = webhook_secret
        self.backend = backend  # Celery's result backend, for the endings no task returns

    def record(
        self,
        result: JobResult,
        job: Any,
        *,
        write_s3: bool = True,
        to_backend: bool = False,
        dead: bool = False,
        write_failed: Callable[[ResultWriteError], None] = lambda error: None,
    ) -> None:
        """Record `result` as the end of `job` (its JSON, for the dead letters and its batch).

        Args:
            write_s3: write the result to the store (False: it is the result already stored there).
            to_backend: store it in Celery's result backend too (no task returns it).
            dead: keep the job in its queue's dead letters.
            write_failed: sees a failed S3 write before anything else is recorded; it may raise (a worker's retry),
                else the result stays in Redis only.
        """
        if write_s3:
            try:
                self.results.write(result)
            except ResultWriteError as error:
                write_failed(error)
                log.error("job %s: %s; its result is in Redis only", result.id, error)
        if to_backend and self.backend is not None:
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
