"""The Celery task `vlmq.run`: one job per task, so acks, retries and results stay per job."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.utils.time import get_exponential_backoff_interval

from producer.jobs import TASK_NAME
from worker.engine import Engine, parse_job
from worker.errors import InvalidJob, ResultWriteFailed, VlmqError

log = logging.getLogger(__name__)


def register_tasks(app: Celery, engine: Engine) -> None:
    """Register `vlmq.run` on `app`, bound to this process's engine."""
    settings = engine.settings

    @app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=settings.max_retries)
    def run(self: Task, payload: Any) -> dict[str, Any]:
        """Run one job; always returns a JobResult (as JSON), `failed` with a coded error when it fails."""
        attempts = self.request.retries + 1
        task_id = str(self.request.id)
        try:
            job = parse_job(payload, task_id)
        except InvalidJob as exc:
            log.warning("job %s refused: %s", task_id, exc.message)
            result = engine.failed(task_id, exc, attempts)
        else:
            try:
                result = engine.succeeded(job, engine.execute(job), attempts)
            except VlmqError as exc:
                retry_later(self, exc)
                log.info("job %s failed: %s: %s", job.id, exc.code, exc.message)
                result = engine.failed(job.id, exc, attempts, job.metadata)
            except Exception as exc:  # a bug, not bad input: still one coded, recorded result for the job
                log.exception("job %s: unexpected error", job.id)
                error = VlmqError(f"unexpected {type(exc).__name__}: {exc}. This is a vlmq bug; please report it")
                result = engine.failed(job.id, error, attempts, job.metadata)
        try:
            engine.results.write(result)
        except ResultWriteFailed as exc:
            retry_later(self, exc)
            log.error("job %s: %s; its result is in Redis only", result.id, exc.message)
        engine.metrics.finished(result)
        return result.model_dump(mode="json")

    def retry_later(task: Task, exc: VlmqError) -> None:
        """Raise Celery's Retry for a retryable error while retries are left (exponential backoff, full jitter)."""
        if not exc.retryable or task.request.retries >= settings.max_retries:
            return
        delay = get_exponential_backoff_interval(
            factor=settings.retry_backoff_s,
            retries=task.request.retries,
            maximum=settings.retry_backoff_max_s,
            full_jitter=True,
        )
        engine.metrics.retries.labels(exc.code).inc()
        log.warning("job %s: %s; retry %d in %d s", task.request.id, exc.message, task.request.retries + 1, delay)
        raise task.retry(exc=exc, countdown=delay)
