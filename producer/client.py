"""Submit jobs and collect results. Needs only Redis (and S3 for results past their Redis expiry); never torch."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from typing import Any

from celery.result import AsyncResult
from tqdm import tqdm

from producer.batch import BatchHandle
from producer.cancel import cancel_queued
from producer.core.batches import BatchStore
from producer.core.endings import Endings
from producer.core.jobs import JOB_ID_PATTERN, Job, JobResult
from producer.core.ledger import DeadLetter, Ledger
from producer.core.publish import Priority, Publisher, again, fresh, now_iso, producer_app
from producer.core.results import ResultReader, ResultStore
from producer.core.settings import SharedSettings
from producer.core.storage import make_s3_client
from producer.errors import InvalidBatchName
from producer.settings import ClientSettings

__all__ = ["BatchHandle", "Client", "JobHandle", "Priority"]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while part := list(itertools.islice(iterator, size)):
        yield part


def _in_batch(job: Job | dict[str, Any], name: str) -> Job:
    """The job, validated, as a member of batch `name`."""
    if isinstance(job, dict):
        return Job.model_validate({**job, "batch": name})
    return job if job.batch == name else job.model_copy(update={"batch": name})


class JobHandle:
    """A submitted job: its id, and a way to wait for its result."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r})"

    @property
    def state(self) -> str:
        """Celery's state of the job: PENDING (queued, or unknown), STARTED, RETRY, SUCCESS, ..."""
        return str(AsyncResult(self.id, app=self.client.celery).state)

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job's result.

        Raises:
            ResultTimeout: no result after `timeout` seconds (the job may still be queued or running); it is a
                `TimeoutError` too.
        """
        return self.client.result(self.id, timeout=timeout)


class Client:
    """Submits jobs to vlmq workers and collects their results.

    Args:
        settings: a `ClientSettings`; when omitted, built from `VLMQ_*` environment variables and `overrides`
            (e.g. `Client(broker_url="redis://queue:6379/0")`).

    Example:
        >>> client = Client.from_env()
        >>> handle = client.submit(Job(task="caption", media=["s3://media/cat.jpg"]))
        >>> handle.result(timeout=120).text
    """

    def __init__(self, settings: SharedSettings | None = None, **overrides: Any) -> None:
        self.settings = settings or ClientSettings(**overrides)
        self.celery = producer_app(self.settings)

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        """A client configured from `VLMQ_*` environment variables (explicit `overrides` win)."""
        return cls(ClientSettings(**overrides))

    @cached_property
    def s3(self) -> Any:
        return make_s3_client(self.settings)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.settings)

    @cached_property
    def publisher(self) -> Publisher:
        return Publisher(self.celery, self.ledger)

    @cached_property
    def result_store(self) -> ResultStore:
        return ResultStore(self.s3, self.settings)

    @cached_property
    def result_reader(self) -> ResultReader:
        return ResultReader(self.celery, self.result_store)

    @cached_property
    def batches(self) -> BatchStore:
        return self.endings.batches

    @cached_property
    def endings(self) -> Endings:
        """How a job's end is recorded (producer/core/endings.py), for the jobs this client ends itself (cancel)."""
        return Endings(self.result_store, self.ledger, self.settings.webhook_secret, self.celery.backend)

    def submit(
        self, job: Job | dict[str, Any], *, force: bool = False, priority: Priority = "interactive"
    ) -> JobHandle:
        """Validate and enqueue one job; returns at once.

        A job id that already succeeded is not run again: the worker returns the stored result (`force=True`
        runs it again). Single jobs go to the interactive queue, which workers serve before the bulk queue;
        send many jobs with `run()` or `priority="bulk"` so they do not hold up other services' single jobs.

        Raises:
            pydantic.ValidationError: the job breaks the contract; the message names the field.
        """
        job_id, payload = fresh(job)
        self.publisher.publish([(job_id, payload)], self.publisher.queue(priority), force)
        return JobHandle(self, job_id)

    def submit_once(self, job: Job | dict[str, Any], *, priority: Priority = "interactive") -> tuple[JobHandle, bool]:
        """Like `submit`, but a job whose id is already queued, running or succeeded is not sent again: the same
        id twice is one job, even from two callers at once. Returns the handle and whether this call sent it.

        A job id that ended failed is sent again (its old result is dropped from Redis at once, so waiting for the
        id waits for the new run).

        Raises:
            pydantic.ValidationError: the job breaks the contract; the message names the field.
        """
        job_id, payload = fresh(job)
        return JobHandle(self, job_id), self.send_once([(job_id, payload)], priority)[0]

    def send_once(self, items: Sequence[tuple[str, dict[str, Any]]], priority: Priority = "interactive") -> list[bool]:
        """`submit_once` for many validated jobs ((id, job JSON), as `publish.fresh` makes them) in a few round
        trips whatever their number; returns, for each, whether this call sent it."""
        claims = self.ledger.claim([job_id for job_id, _ in items])
        send = [item for item, claim in zip(items, claims, strict=True) if claim is None]
        try:
            self._forget_results([job_id for job_id, _ in send])
            self.publisher.publish(send, self.publisher.queue(priority))
        finally:
            self.ledger.release([job_id for job_id, _ in send])
        return [claim is None for claim in claims]

    def _forget_results(self, job_ids: Sequence[str]) -> None:
        """Drop Celery's stored results of these ids (a failed earlier run's), in one round trip on Redis."""
        backend: Any = self.celery.backend
        if not job_ids:
            return
        if hasattr(backend, "client") and hasattr(backend, "get_key_for_task"):
            backend.client.delete(*(backend.get_key_for_task(job_id) for job_id in job_ids))
            return
        for job_id in job_ids:
            AsyncResult(job_id, app=self.celery).forget()

    def cancel(self, job_id: str) -> JobResult | None:
        """Cancel a job no worker has taken yet: it ends `cancelled` without running. Returns its result, or None
        when it cannot be cancelled (a worker has it, it has ended, or it is unknown)."""
        raw = self.ledger.redis.hget(self.ledger.payloads_key, job_id)
        if raw is None:
            return None
        return cancel_queued(self.endings, self.settings.queues, job_id, json.loads(raw))

    def send_json(self, job_id: str, payload: dict[str, Any], queue: str | None = None, force: bool = False) -> None:
        """Enqueue a job's JSON as it is, under `job_id` (for jobs validated before: dead letters, lost messages);
        `queue` defaults to the bulk queue."""
        self.publisher.publish([(job_id, payload)], queue or self.settings.queue, force)

    def batch(self, name: str) -> BatchHandle:
        """A handle on the named batch (submitted now or earlier, by any producer)."""
        return BatchHandle(self, name)

    def submit_batch(
        self,
        name: str,
        jobs: Iterable[Job | dict[str, Any]],
        *,
        webhook: str | None = None,
        progress: bool = True,
        chunk: int = 1000,
    ) -> BatchHandle:
        """Enqueue `jobs` as the named batch, `chunk` at a time (memory stays flat), to the bulk queue.

        Submitting a batch again skips its jobs that already succeeded or are still queued or running (same
        ids: give `id`s, or let manifests derive them) and sends the others again. `webhook` gets a signed POST
        when the batch ends.

        Raises:
            InvalidBatchName: `name` is not made of letters, digits and `. _ : -` (at most 128); a `ValueError` too.
            pydantic.ValidationError: a job breaks the contract (the jobs before it were sent; validate
                manifests first with `producer.manifest.validate_manifest`).
        """
        if not re.fullmatch(JOB_ID_PATTERN, name):
            raise InvalidBatchName(f"batch name {name!r}: use letters, digits and . _ : - (at most 128)")
        self.batches.begin(name, webhook)
        skipped = 0
        with tqdm(desc=f"enqueue {name}", unit="job", disable=not progress) as bar:
            for part in _chunks(jobs, chunk):
                skipped += self._submit_to_batch(name, [_in_batch(j, name) for j in part])
                bar.update(len(part))
                bar.set_postfix(already_succeeded=skipped, refresh=False)
        if self.batches.close_submission(name):  # every job had already succeeded
            posting = self.batches.announce(name, self.settings.webhook_secret)
            if posting is not None:
                posting.join(60)  # this process may exit right after: let the POST finish
        return BatchHandle(self, name)

    def _submit_to_batch(self, name: str, validated: list[Job]) -> int:
        """Count `validated` into the batch and send those not succeeded or pending; returns how many were skipped."""
        ids = [j.id for j in validated]
        known = self.ledger.known_many(ids)  # succeeded: skipped; pending: its message is still queued
        states = self.batches.states(name, ids)
        send = [j for j, k in zip(validated, known, strict=True) if k is None]
        self.batches.add(
            name,
            ids,
            requeued=[j.id for j, k, st in zip(validated, known, states, strict=True) if k is None and st],
            succeeded=[i for i, k in zip(ids, known, strict=True) if k == "succeeded"],
        )
        now = now_iso()
        self.publisher.publish(
            [again(j.id, j.model_dump(mode="json", exclude_none=True), now) for j in send], self.settings.queue
        )
        return len(validated) - len(send)

    def dead_letters(self) -> list[DeadLetter]:
        """Jobs of this client's queue that failed after exhausting their retries or crashing workers."""
        return self.ledger.dead_letters()

    def retry_failed(self, job_ids: Sequence[str] | None = None) -> list[str]:
        """Enqueue dead-lettered jobs again under their own ids (all of them, or `job_ids`); returns the ids sent.

        Their stored failed results are removed first, so `result()` waits for the new run.
        """
        wanted = None if job_ids is None else set(job_ids)
        letters = [
            letter
            for letter in self.dead_letters()
            # a message with no usable id carries no job to run again
            if letter.message is None and (wanted is None or letter.result.id in wanted)
        ]
        for letter in letters:
            self.forget(letter.result.id)
        now = now_iso()
        self.publisher.publish([again(letter.result.id, letter.job, now) for letter in letters], self.settings.queue)
        return [letter.result.id for letter in letters]

    def forget(self, job_id: str) -> None:
        """Drop a job's stored result (Redis and S3) and bookkeeping, before it runs again from the start."""
        self.ledger.forget(job_id)
        AsyncResult(job_id, app=self.celery).forget()
        self.result_store.delete(job_id)

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """The result of a job: from Redis while it is kept there, else from S3; waits up to `timeout` seconds.

        Raises:
            ResultTimeout: no result yet after `timeout` seconds; it is a `TimeoutError` too.
        """
        return self.result_reader.wait(job_id, timeout)

    def peek(self, job_id: str) -> JobResult | None:
        """The job's result if it has one now (Redis, then S3), else None. Never waits."""
        return self.result_reader.peek(job_id)

    def run(
        self,
        jobs: Iterable[Job | dict[str, Any]],
        *,
        progress: bool = True,
        timeout: float | None = None,
        poll_interval_s: float = 0.1,
        priority: Priority = "bulk",
    ) -> list[JobResult]:
        """Submit many jobs and wait for all of them; results come back in input order.

        Args:
            jobs: `Job`s or job dicts; all are validated before any is sent.
            progress: show a progress bar (done / total, rate, ETA) on stderr.
            timeout: seconds to wait for all results after the last submission.
            priority: "bulk" (default) or "interactive", the queue the jobs go to.

        Raises:
            pydantic.ValidationError: a job breaks the contract (nothing was sent).
            ResultTimeout: some results did not arrive in time; it is a `TimeoutError` too.
        """
        outgoing = [fresh(job) for job in jobs]
        self.publisher.publish(outgoing, self.publisher.queue(priority))
        return self.collect(
            [job_id for job_id, _ in outgoing], progress=progress, timeout=timeout, poll_interval_s=poll_interval_s
        )

    def collect(
        self,
        job_ids: Sequence[str],
        *,
        progress: bool = True,
        timeout: float | None = None,
        poll_interval_s: float = 0.1,
    ) -> list[JobResult]:
        """Wait for the results of already submitted jobs, in the order of `job_ids`.

        Raises:
            ResultTimeout: some results did not arrive in time; it is a `TimeoutError` too.
        """
        return self.result_reader.collect(job_ids, progress, timeout, poll_interval_s)
