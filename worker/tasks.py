"""The Celery task `vlmq.run`: one job per task, so acks, retries and results stay per job.

Delivery is at least once (late acks: a worker killed mid-job leaves the message to be redelivered). The ledger
turns that into one terminal result per job: a redelivered copy of a job that already succeeded returns the stored
result, and a job that was running when workers died `max_crashes` times is dead-lettered instead of looping.
"""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery, Task
from celery.utils.time import get_exponential_backoff_interval

from producer.batch import BatchStore, JobState
from producer.jobs import TASK_NAME, JobResult
from producer.ledger import Ledger
from producer.storage import read_result
from worker.engine import Engine, parse_job
from worker.errors import Cancelled, Expired, InvalidJob, ResultWriteFailed, VlmqError, WorkerLost
from worker.gate import Deadlines, Refused
from worker.isolation import Isolation

log = logging.getLogger(__name__)


def refusal_recorder(app: Celery, engine: Engine, ledger: Ledger) -> Callable[[Refused, dict[str, Any]], None]:
    """How the gate's refusals end: a failed result under the message's task id (Redis, S3, metrics, its batch's
    count, and the dead letters for `worker_lost`), or, with no usable id, a dead letter holding a copy of the
    message. A pickle or other non-JSON body is never decoded."""
    batches = BatchStore(ledger.redis)

    def record(refusal: Refused, message: dict[str, Any]) -> None:
        if refusal.task_id is None:
            result = engine.failed(f"message:{uuid.uuid4()}", refusal.error, attempts=1)
            kept = ledger.dead_message(message, result)
            log.error(
                "message without a usable task id %s: %s (headers %.200s)",
                f"kept in the dead letters as {result.id}" if kept else "dropped: the dead letters are full",
                refusal.error.message,
                message["headers"],
            )
            engine.metrics.finished(result)
            return
        if ledger.succeeded(refusal.task_id):  # a copy put back after its job succeeded: keep the success
            log.info("message %s refused, but its job already succeeded; keeping the success", refusal.task_id)
            return
        job = refusal.job or {}
        metadata = job.get("metadata")
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            metadata = None
        result = engine.failed(refusal.task_id, refusal.error, refusal.attempts, metadata)
        log.warning("job %s refused: %s: %s", result.id, refusal.error.code, refusal.error.message)
        try:
            engine.results.write(result)
        except ResultWriteFailed as write_error:
            log.error("job %s: %s; its result is in Redis only", result.id, write_error.message)
        app.backend.store_result(result.id, result.model_dump(mode="json"), "SUCCESS")
        if isinstance(refusal.error, WorkerLost):
            ledger.dead_letter(job, result)
        ledger.finished(result)
        count_in_batch(batches, engine.settings.webhook_secret, job, result)
        engine.metrics.finished(result)

    return record


def count_in_batch(batches: BatchStore, secret: str | None, payload: Any, result: JobResult) -> None:
    """Count the job's end in its batch (if it has one); the call that ends the batch announces it."""
    batch = payload.get("batch") if isinstance(payload, dict) else None
    if not isinstance(batch, str):
        return
    code = result.error.code if result.error else None
    state: JobState = "succeeded" if result.ok else "cancelled" if code == "cancelled" else "failed"
    try:
        if batches.finished(batch, result.id, state, payload if state == "failed" else None):
            batches.announce(batch, secret)
    except redis.RedisError as exc:
        log.error("job %s: could not count its end in batch %s (%s)", result.id, batch, exc)


def register_tasks(
    app: Celery,
    engine: Engine,
    ledger: Ledger,
    deadlines: Deadlines | None = None,
    progressed: Callable[[], None] = lambda: None,
) -> None:
    """Register `vlmq.run` on `app`, bound to this process's engine.

    `deadlines` holds the Celery `expires` the gate took from messages; `progressed` is told when a job starts and
    when it ends (liveness).
    """
    settings = engine.settings
    deadlines = deadlines or Deadlines()
    isolation = Isolation()
    batches = BatchStore(ledger.redis)

    @app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=settings.max_retries)
    def run(self: Task, payload: Any, force: bool = False) -> dict[str, Any]:
        """Run one job; always returns a JobResult (as JSON), `failed` with a coded error when it fails.

        `force=True` runs a job again even if a result of an earlier success is stored.
        """
        task_id = str(self.request.id)
        # A redelivered message whose job was started more often than its retries explain was running when a worker
        # died: it runs alone this time, so that if it is what kills workers it takes no neighbour with it.
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        suspect = redelivered and ledger.taken(task_id) > self.request.retries
        progressed()
        try:
            with isolation.alone() if suspect else isolation.shared():
                return handle(self, task_id, payload, force=force, redelivered=redelivered)
        finally:
            progressed()

    def handle(task: Task, task_id: str, payload: Any, *, force: bool, redelivered: bool) -> dict[str, Any]:
        starts, succeeded_before = ledger.started(task_id, task.request.retries)
        attempts = starts
        crashes = starts - 1 - task.request.retries  # starts that neither finished nor asked for a retry
        # The S3 result is the commit point: a copy redelivered after its worker died between writing it and
        # acknowledging the message, or a resubmitted id that succeeded, returns it instead of running again.
        # A start more than its retries explain also means an earlier copy may have finished (its end was not
        # recorded: Redis was down), and the lost-message recovery sent it again.
        if (redelivered or succeeded_before or crashes > 0) and not force:
            stored = stored_success(task_id)
            if stored is not None:
                log.info("job %s already succeeded; returning its stored result", task_id)
                ledger.finished(stored)
                count_in_batch(batches, settings.webhook_secret, payload, stored)
                return stored.model_dump(mode="json")
        dead = False
        try:
            job = parse_job(payload, task_id)
        except InvalidJob as exc:
            log.warning("job %s refused: %s", task_id, exc.message)
            result = engine.failed(task_id, exc, attempts)
        else:
            batch = job.batch
            expires = deadlines.pop(task_id)
            if expires is not None and expires <= datetime.now(UTC):
                late = Expired(f"the message's Celery expires ({expires.isoformat()}) passed before the job started")
                result = engine.failed(job.id, late, attempts, job.metadata)
            elif batch is not None and batch_cancelled(batch):
                result = engine.failed(
                    job.id, Cancelled(f"batch {batch} was cancelled before this job started"), attempts, job.metadata
                )
            elif crashes >= settings.max_crashes:
                error = WorkerLost(
                    f"workers died {crashes} times while running this job, so it was not run again. Its media may "
                    "crash the decoder or the model: check them, then `vlmq retry-failed`"
                )
                log.error("job %s: %s", job.id, error.message)
                result, dead = engine.failed(job.id, error, attempts, job.metadata), True
            else:
                if batch is not None:
                    with contextlib.suppress(redis.RedisError):  # only the running count misses it
                        batches.started(batch, job.id)
                result, dead = run_job(task, job, attempts)
                if not result.ok and ledger.succeeded(job.id):
                    # Another copy of the job (a duplicate message) succeeded meanwhile: keep its result.
                    stored = stored_success(job.id)
                    if stored is not None:
                        log.info("job %s: a copy failed but another succeeded; keeping the success", job.id)
                        return stored.model_dump(mode="json")
        try:
            engine.results.write(result)
        except ResultWriteFailed as exc:
            retry_later(task, exc)
            log.error("job %s: %s; its result is in Redis only", result.id, exc.message)
        code = f" {result.error.code}" if result.error else ""
        log.info("job %s finished: %s%s, attempt %d", result.id, result.status, code, result.attempts)
        if dead:
            ledger.dead_letter(payload, result)
        ledger.finished(result)
        count_in_batch(batches, settings.webhook_secret, payload, result)
        engine.metrics.finished(result)
        return result.model_dump(mode="json")

    def stored_success(job_id: str) -> JobResult | None:
        """The job's result in S3 if it succeeded (the commit point of a success)."""
        stored = read_result(engine.results.s3, settings, job_id)
        return stored if stored is not None and stored.ok else None

    def batch_cancelled(batch: str) -> bool:
        try:
            return batches.cancelled(batch)
        except redis.RedisError as exc:
            log.warning("could not tell whether batch %s was cancelled (%s); running the job", batch, exc)
            return False

    def run_job(task: Task, job: Any, attempts: int) -> tuple[JobResult, bool]:
        """The job's result, and whether it goes to the dead letters (retries exhausted)."""
        try:
            return engine.succeeded(job, engine.execute(job), attempts), False
        except VlmqError as exc:
            retry_later(task, exc)
            log.info("job %s failed: %s: %s", job.id, exc.code, exc.message)
            return engine.failed(job.id, exc, attempts, job.metadata), exc.retryable
        except Exception as exc:  # a bug, not bad input: still one coded, recorded result for the job
            log.exception("job %s: unexpected error", job.id)
            error = VlmqError(f"unexpected {type(exc).__name__}: {exc}. This is a vlmq bug; please report it")
            return engine.failed(job.id, error, attempts, job.metadata), False

    def retry_later(task: Task, exc: VlmqError) -> None:
        """Raise Celery's Retry for a retryable error while retries are left (exponential backoff, equal jitter)."""
        if not exc.retryable or task.request.retries >= settings.max_retries:
            return
        # Equal jitter: half the exponential delay fixed, half random. Full jitter often draws 0 s, and a store
        # failing fast (a restarting S3 answers errors in milliseconds) would use up every retry in a second.
        countdown = get_exponential_backoff_interval(
            factor=settings.retry_backoff_s, retries=task.request.retries, maximum=settings.retry_backoff_max_s
        )
        delay = countdown / 2 + random.uniform(0, countdown / 2)
        engine.metrics.retries.labels(exc.code).inc()
        ledger.requeued(str(task.request.id))
        log.warning("job %s: %s; retry %d in %.1f s", task.request.id, exc.message, task.request.retries + 1, delay)
        raise task.retry(exc=exc, countdown=delay)
