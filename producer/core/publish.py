"""The one way jobs are sent: `Publisher.publish`, used by `submit`, `run`, `submit_batch`, both retry paths and the
worker's lost-message recovery.

A publish records every job in the ledger in one Redis round trip (the lost-message recovery needs the entry to
exist before the message does), then pushes the messages through one kombu publish batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from celery import Celery
from celery.backends.redis import RedisBackend

from producer.core.celery_config import celery_config
from producer.core.jobs import TASK_NAME, Job
from producer.core.ledger import Ledger
from producer.core.settings import SharedSettings

Priority = Literal["interactive", "bulk"]
Outgoing = tuple[str, dict[str, Any]]
"""A job ready to send: its id and its JSON."""

# Celery puts a repr of the arguments in every message header for logs; the job JSON is data, and building its
# repr took a third of the enqueue time. Workers log the job id instead.
_ARGSREPR = "(job,)"


class _PollingRedisBackend(RedisBackend):
    """Celery's Redis result backend without the per-task pub/sub subscription made when a task is sent.

    The client polls results in bulk (`get_many`) and never blocks on `AsyncResult.get`, so subscribing to and
    unsubscribing from one channel per job only slowed sending (by a third, measured in bench/enqueue.py).
    """

    def __init__(self, app: Celery, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app=app, url=url or app.conf.result_backend, **kwargs)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        pass


def producer_app(settings: SharedSettings) -> Celery:
    """The Celery app producers send with (and read Celery results through)."""
    celery = Celery("vlmq-producer", set_as_current=False)
    celery.conf.update(celery_config(settings))
    if settings.backend_url.startswith(("redis://", "rediss://")):
        celery.backend_cls = _PollingRedisBackend  # type: ignore[assignment]  # a class is accepted too
    return celery


def fresh(job: Job | dict[str, Any]) -> Outgoing:
    """A new job as `submit` and `run` send it: validated (a `Job` again too: it may have changed since it was
    built), stamped `submitted_at` now unless it has one.

    Raises:
        pydantic.ValidationError: the job breaks the contract; the message names the field.
    """
    job = Job.model_validate(job) if isinstance(job, dict) else Job.model_validate(job.model_dump())
    if job.submitted_at is None:
        job.submitted_at = datetime.now(UTC)
    return job.id, job.model_dump(mode="json", exclude_none=True)


def again(job_id: str, job: dict[str, Any], now: str) -> Outgoing:
    """Job JSON validated before (a batch's, a failed job's) sent now: `submitted_at` is `now`, an ISO time."""
    return job_id, {**job, "submitted_at": now}


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class Publisher:
    """Sends jobs: ledger entries first, then the messages."""

    def __init__(self, celery: Celery, ledger: Ledger) -> None:
        self.celery = celery
        self.ledger = ledger
        self.settings = ledger.settings

    def queue(self, priority: Priority) -> str:
        """The queue of a priority: single jobs go to the interactive queue, many to the bulk queue."""
        return self.settings.interactive_queue if priority == "interactive" else self.settings.queue

    def publish(self, items: Sequence[Outgoing], queue: str, force: bool = False) -> None:
        """Send already validated jobs to `queue`, under their own ids; `force` runs them even if they succeeded.

        Raises if Redis is down (before any message is pushed when the ledger cannot be written).
        """
        if not items:
            return
        self.ledger.record_sent(items, queue, force)
        kwargs = {"force": True} if force else {}
        # kombu's publish batch: the messages go to Redis in one pipeline per 1,000, not one round trip each.
        # The queue is declared with the first message only (kombu re-binds it on every publish otherwise).
        with self.celery.producer_or_acquire() as producer, producer.batch(max_size=1000):
            for n, (job_id, payload) in enumerate(items):
                self.celery.send_task(
                    TASK_NAME,
                    args=[payload],
                    kwargs=kwargs,
                    task_id=job_id,
                    queue=queue,
                    producer=producer,
                    argsrepr=_ARGSREPR,
                    kwargsrepr="{}",
                    declare=None if n == 0 else [],
                )
