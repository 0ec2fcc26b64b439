"""The Celery task `vlmq.run`, a thin shim over the job lifecycle (worker/lifecycle.py): one job per task, so
acks, retries and results stay per job. Also how the gate's refusals end (`RefusalRecorder`).

Both are module-level classes whose dependencies are handed over when the worker starts (worker/app.py), as arq's
`Worker(functions=...)` takes its functions.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from botocore.exceptions import BotoCoreError, ClientError
from celery import Task
from celery.exceptions import Retry

from producer.core.jobs import TASK_NAME, Job, JobResult
from producer.core.ledger import Ledger
from worker.errors import Cancelled, Expired, InvalidJob, VlmqError, WorkerLost
from worker.gate import Deadlines, Refused
from worker.isolation import Isolation
from worker.lifecycle import Deadline, Finisher, Start, decide, retries_left, retry_delay
from worker.pipeline import Pipeline, parse_job

log = logging.getLogger(__name__)


@dataclass
class Services:
    """What a job's run needs from its worker process, handed to the task and the gate's refusals at start-up."""

    pipeline: Pipeline
    ledger: Ledger
    finisher: Finisher
    deadlines: Deadlines = field(default_factory=Deadlines)  # the Celery `expires` the gate took from messages
    progressed: Callable[[], None] = lambda: None  # told when a job starts and when it ends (liveness)
    isolation: Isolation = field(default_factory=Isolation)


class RunJob(Task):
    """`vlmq.run`: run one job; always returns a JobResult (as JSON), `failed` with a coded error when it fails.

    `force=True` runs a job again even if a result of an earlier success is stored.
    """

    name = TASK_NAME
    acks_late = True

    def __init__(self, services: Services) -> None:
        self.services = services
        self.max_retries = services.pipeline.settings.max_retries

    def run(self, payload: Any, force: bool = False) -> dict[str, Any]:
        s = self.services
        task_id = str(self.request.id)
        # A redelivered message whose job was started more often than its retries explain was running when a worker
        # died: it runs alone this time, so that if it is what kills workers it takes no neighbour with it.
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        suspect = redelivered and s.ledger.record_taken(task_id) > self.request.retries
        s.progressed()
        try:
            with s.isolation.alone() if suspect else s.isolation.shared():
                return JobRun(self, s, payload).run(force=force, redelivered=redelivered)
        finally:
            s.progressed()


class RefusalRecorder:
    """How the gate's refusals end: a failed result under the message's task id (stored in Celery's backend too: no
    task returns it), or, with no usable id, a dead letter holding a copy of the message. A pickle or other non-JSON
    body is never decoded."""

    def __init__(self, services: Services) -> None:
        self.pipeline, self.ledger, self.finisher = services.pipeline, services.ledger, services.finisher

    def __call__(self, refusal: Refused, message: dict[str, Any]) -> None:
        if refusal.task_id is None:
            result = self.pipeline.failed(f"message:{uuid.uuid4()}", refusal.error, attempts=1)
            kept = self.ledger.dead_letter_message(message, result)
            log.error(
                "message without a usable task id %s: %s (headers %.200s)",
                f"kept in the dead letters as {result.id}" if kept else "dropped: the dead letters are full",
                refusal.error.message,
                message["headers"],
            )
            self.pipeline.metrics.finished(result)
            return
        if self.ledger.has_succeeded(refusal.task_id):  # a copy put back after its job succeeded: keep the success
            log.info("message %s refused, but its job already succeeded; keeping the success", refusal.task_id)
            return
        job = refusal.job or {}
        metadata = job.get("metadata")
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            metadata = None
        result = self.pipeline.failed(refusal.task_id, refusal.error, refusal.attempts, metadata)
        log.warning("job %s refused: %s: %s", result.id, refusal.error.code, refusal.error.message)
        self.finisher.finish(result, job, to_backend=True, dead=isinstance(refusal.error, WorkerLost))


class JobRun:
    """One start of one job's message: from the lifecycle's decisions to its recorded end."""

    def __init__(self, task: Task, services: Services, payload: Any) -> None:
        self.task = task
        self.pipeline = services.pipeline
        self.settings = services.pipeline.settings
        self.ledger = services.ledger
        self.finisher = services.finisher
        self.deadlines = services.deadlines
        self.payload = payload
        self.task_id = str(task.request.id)
        self.retries: int = task.request.retries
        self.expires: datetime | None = None  # the message's Celery expires, which the gate took out of its headers

    def run(self, *, force: bool, redelivered: bool) -> dict[str, Any]:
        starts, succeeded_before = self.ledger.record_started(self.task_id, self.retries)
        start = Start(starts, self.retries, redelivered, succeeded_before, force)
        if start.may_have_finished:
            stored = self.stored_result()
            if stored is not None and start.ended_by(stored, submitted_at(self.payload)):
                log.info("job %s already ended %s; returning its stored result", self.task_id, stored.status)
                self.finisher.finish(stored, self.payload, write_s3=False)
                return stored.model_dump(mode="json")
        try:
            job = parse_job(self.payload, self.task_id)
        except InvalidJob as exc:
            log.warning("job %s refused: %s", self.task_id, exc.message)
            return self.end(self.pipeline.failed(self.task_id, exc, starts))
        self.expires = self.deadlines.pop(self.task_id)
        deadline = Deadline(self.expires, job.submitted_at, job.ttl_s or self.settings.job_ttl_s)
        now = datetime.now(UTC)
        in_cancelled_batch = self.batch_cancelled(job.batch)
        decision = decide(
            start, max_crashes=self.settings.max_crashes, deadline=deadline, now=now, cancelled=in_cancelled_batch
        )
        if decision == "expired":
            late = Expired(deadline.passed(now) or "its deadline passed before it started")
            return self.end(self.pipeline.failed(job.id, late, starts, job.metadata))
        if decision == "cancelled":
            cancelled = Cancelled(f"batch {job.batch} was cancelled before this job started")
            return self.end(self.pipeline.failed(job.id, cancelled, starts, job.metadata))
        if decision == "dead":
            error = WorkerLost(
                f"workers died {start.crashes} times while running this job, so it was not run again. Its media "
                "may crash the decoder or the model: check them, then `vlmq retry-failed`"
            )
            log.error("job %s: %s", job.id, error.message)
            return self.end(self.pipeline.failed(job.id, error, starts, job.metadata), dead=True)
        return self.execute(job, starts)

    def execute(self, job: Job, attempts: int) -> dict[str, Any]:
        if job.batch is not None:
            with contextlib.suppress(redis.RedisError):  # only the running count misses it
                self.finisher.batches.record_started(job.batch, job.id)
        try:
            result = self.pipeline.succeeded(job, self.pipeline.execute(job), attempts)
            return self.end(result)
        except VlmqError as exc:
            self.retry_later(exc)
            log.info("job %s failed: %s: %s", job.id, exc.code, exc.message)
            # Dead-lettered: a job whose retries ran out, and one that killed its preparing processes (as one that
            # kills whole workers is, in `run`).
            dead = exc.retryable or isinstance(exc, WorkerLost)
            result = self.pipeline.failed(job.id, exc, attempts, job.metadata)
        except Retry:  # its result could not be written (S3 down): retried, not a bug
            raise
        except Exception as exc:  # a bug, not bad input: still one coded, recorded result for the job
            log.exception("job %s: unexpected error", job.id)
            error = VlmqError(f"unexpected {type(exc).__name__}: {exc}. This is a vlmq bug; please report it")
            result, dead = self.pipeline.failed(job.id, error, attempts, job.metadata), False
        if self.ledger.has_succeeded(job.id):
            # Another copy of the job (a duplicate message) succeeded meanwhile: keep its result.
            stored = self.stored_success()
            if stored is not None:
                log.info("job %s: a copy failed but another succeeded; keeping the success", job.id)
                return stored.model_dump(mode="json")
        return self.end(result, dead=dead)

    def end(self, result: JobResult, dead: bool = False) -> dict[str, Any]:
        self.finisher.finish(result, self.payload, dead=dead, write_failed=self.retry_later)
        code = f" {result.error.code}" if result.error else ""
        log.info("job %s finished: %s%s, attempt %d", result.id, result.status, code, result.attempts)
        return result.model_dump(mode="json")

    def stored_success(self) -> JobResult | None:
        """The job's result in S3 if it succeeded (the commit point of a success)."""
        stored = self.stored_result()
        return stored if stored is not None and stored.ok else None

    def stored_result(self) -> JobResult | None:
        """The job's result in S3, if one is stored.

        When S3 cannot be read the job runs as if none were stored: running again is at-least-once delivery's
        normal cost, and its own result write retries until S3 is back.
        """
        try:
            return self.pipeline.results.read(self.task_id)
        except (BotoCoreError, ClientError) as exc:
            log.warning("job %s: could not look for its stored result (%s); running it", self.task_id, exc)
            return None

    def batch_cancelled(self, batch: str | None) -> bool:
        if batch is None:
            return False
        try:
            return self.finisher.batches.is_cancelled(batch)
        except redis.RedisError as exc:
            log.warning("could not tell whether batch %s was cancelled (%s); running the job", batch, exc)
            return False

    def retry_later(self, exc: VlmqError) -> None:
        """Raise Celery's Retry for a retryable error while retries are left."""
        if not retries_left(exc, self.retries, self.settings.max_retries):
            return
        delay = retry_delay(self.retries, self.settings.retry_backoff_s, self.settings.retry_backoff_max_s)
        self.pipeline.metrics.retries.labels(exc.code).inc()
        self.ledger.record_requeued(self.task_id)
        log.warning("job %s: %s; retry %d in %.1f s", self.task_id, exc.message, self.retries + 1, delay)
        # Celery's retry copies the request's `expires`, but the gate took it out of the headers Celery read (Celery
        # would only revoke an expired job, with no result): hand it on, so the retry still ends `expired` once due.
        raise self.task.retry(exc=exc, countdown=delay, expires=self.expires)  # type: ignore[arg-type]  # None: none


def submitted_at(payload: Any) -> datetime | None:
    """The job's `submitted_at` (the gate stamps one on other clients' jobs), or None when unreadable."""
    value = payload.get("submitted_at") if isinstance(payload, dict) else None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return parsed if parsed is None or parsed.tzinfo else parsed.replace(tzinfo=UTC)
