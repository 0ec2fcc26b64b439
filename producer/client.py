"""Submit jobs and collect results. Needs only Redis (and S3 for results past their Redis expiry); never torch."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import IO, Any, Literal

from celery import Celery
from celery.backends.redis import RedisBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from tqdm import tqdm

from producer.batch import BatchStatus, BatchStore
from producer.celery_config import celery_config
from producer.jobs import JOB_ID_PATTERN, TASK_NAME, ErrorCode, Job, JobError, JobResult
from producer.ledger import DeadLetter, Ledger
from producer.settings import ClientSettings
from producer.storage import make_s3_client, read_result

_READY_STATES = {"SUCCESS", "FAILURE", "REVOKED"}
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


Priority = Literal["interactive", "bulk"]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while part := list(itertools.islice(iterator, size)):
        yield part


def _in_batch(job: Job | dict[str, Any], name: str) -> Job:
    """The job, validated, as a member of batch `name`."""
    if isinstance(job, dict):
        return Job.model_validate({**job, "batch": name})
    return job if job.batch == name else job.model_copy(update={"batch": name})


def _from_meta(job_id: str, state: str, value: Any) -> JobResult:
    """A JobResult from a Celery result: the task's return value, or a failed result for a crashed task."""
    if state == "SUCCESS" and isinstance(value, dict):
        return JobResult.model_validate(value)
    code: ErrorCode = "cancelled" if state == "REVOKED" else "internal"
    message = f"the task ended {state} without a result: {value!r}. Check the worker's log for job {job_id}"
    return JobResult(id=job_id, status="failed", error=JobError(code=code, message=message, retryable=False))


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
            TimeoutError: no result after `timeout` seconds (the job may still be queued or running).
        """
        return self.client.result(self.id, timeout=timeout)


class BatchHandle:
    """A named batch: its status, its results as JSONL, and retry-failed / cancel."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self.store = client.batches

    def __repr__(self) -> str:
        return f"BatchHandle(name={self.name!r})"

    def status(self) -> BatchStatus:
        return self.store.status(self.name)

    def cancel(self) -> None:
        """Jobs of the batch that have not started end `cancelled` without model work; running ones finish."""
        self.store.cancel(self.name)

    def retry_failed(self) -> list[str]:
        """Send the batch's failed jobs again under their own ids; returns the ids sent."""
        failed = self.store.failed_jobs(self.name)
        if not failed:
            return []
        ids = list(failed)
        self.store.add_requeued(self.name, ids)
        for job_id in ids:
            self.client.forget(job_id)
        self.client._send_many([(i, {**failed[i], "submitted_at": datetime.now(UTC).isoformat()}) for i in ids])
        self.store.submitted(self.name)
        return ids

    def write_results(self, path: str, errors_path: str) -> tuple[int, int, int]:
        """`results` into files: JSONL, or Parquet when `path` ends with `.parquet` (needs pyarrow)."""
        if not path.endswith(".parquet"):
            with open(path, "w", encoding="utf-8") as out, open(errors_path, "w", encoding="utf-8") as errors:
                return self.results(out, errors)
        out_parquet, errors_parquet = _ParquetLines(path), _ParquetLines(errors_path)
        try:
            return self.results(out_parquet, errors_parquet)  # type: ignore[arg-type]  # anything with write()
        finally:
            out_parquet.close()
            errors_parquet.close()

    def results(self, out: IO[str], errors: IO[str] | None = None, chunk: int = 500) -> tuple[int, int, int]:
        """Write one JobResult JSON line per job in input order (failed ones to `errors` instead, when given).

        Streams `chunk` results at a time from Redis (S3 for those expired there). Returns (succeeded, failed,
        without a result yet).
        """
        counts = [0, 0, 0]
        backend: Any = self.client.celery.backend
        for ids in self.store.ids(self.name, chunk):
            metas = backend.client.mget([backend.get_key_for_task(i) for i in ids])
            states = self.store.states(self.name, ids)
            for job_id, raw, state in zip(ids, metas, states, strict=True):
                if state not in ("succeeded", "failed", "cancelled"):  # not ended in this run: an old result is stale
                    counts[2] += 1
                    continue
                meta = backend.decode_result(raw) if raw else None
                if meta is not None and meta.get("status") in _READY_STATES:
                    result: JobResult | None = _from_meta(job_id, meta["status"], meta["result"])
                else:
                    result = read_result(self.client.s3, self.client.settings, job_id)
                if result is None:
                    counts[2] += 1
                    continue
                counts[0 if result.ok else 1] += 1
                target = out if result.ok or errors is None else errors
                target.write(result.model_dump_json() + "\n")
        return counts[0], counts[1], counts[2]


_PARQUET_FIELDS = (
    "id",
    "status",
    "text",
    "error_code",
    "error_message",
    "model",
    "worker",
    "attempts",
    "batch_size",
    "metadata",
    "finished_at",
)


def _parquet_row(result: JobResult) -> dict[str, Any]:
    """A JobResult flattened for Parquet: the error's code and message as columns, metadata as a JSON string."""
    data = result.model_dump(mode="json")
    error = data.pop("error") or {}
    return {
        **{k: data[k] for k in ("id", "status", "text", "model", "worker", "attempts", "batch_size", "finished_at")},
        "error_code": error.get("code"),
        "error_message": error.get("message"),
        "metadata": json.dumps(data["metadata"]),
    }


class _ParquetLines:
    """A `write(line)` target that collects JobResult JSON lines into a Parquet file, a row group per 10,000."""

    def __init__(self, path: str) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError("Parquet output needs pyarrow: pip install 'vlmq[parquet]'") from None
        self.pa = pa
        fields = [(n, pa.int64() if n in ("attempts", "batch_size") else pa.string()) for n in _PARQUET_FIELDS]
        self.schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(path, self.schema)
        self.rows: list[dict[str, Any]] = []

    def write(self, line: str) -> None:
        self.rows.append(_parquet_row(JobResult.model_validate_json(line)))
        if len(self.rows) >= 10_000:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


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

    def __init__(self, settings: ClientSettings | None = None, **overrides: Any) -> None:
        self.settings = settings or ClientSettings(**overrides)
        self.celery = Celery("vlmq-producer", set_as_current=False)
        self.celery.conf.update(celery_config(self.settings))
        if self.settings.backend_url.startswith(("redis://", "rediss://")):
            self.celery.backend_cls = _PollingRedisBackend  # type: ignore[assignment]  # a class is accepted too

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
        job = Job.model_validate(job) if isinstance(job, dict) else Job.model_validate(job.model_dump())
        if job.submitted_at is None:
            job.submitted_at = datetime.now(UTC)
        queue = self.settings.interactive_queue if priority == "interactive" else self.settings.queue
        self.send_json(job.id, job.model_dump(mode="json", exclude_none=True), queue, force)
        return JobHandle(self, job.id)

    def send_json(self, job_id: str, payload: dict[str, Any], queue: str | None = None, force: bool = False) -> None:
        """Enqueue a job's JSON as it is, under `job_id` (for jobs validated before: dead letters, lost messages);
        `queue` defaults to the bulk queue."""
        queue = queue or self.settings.queue
        kwargs = {"force": True} if force else {}
        self.ledger.sent(job_id, payload, queue, force)
        self.celery.send_task(
            TASK_NAME, args=[payload], kwargs=kwargs, task_id=job_id, queue=queue, argsrepr=_ARGSREPR, kwargsrepr="{}"
        )

    @cached_property
    def batches(self) -> BatchStore:
        return BatchStore(self.ledger.redis, self.ledger.keys)

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
            pydantic.ValidationError: a job breaks the contract (the jobs before it were sent; validate
                manifests first with `producer.manifest.validate_manifest`).
        """
        if not re.fullmatch(JOB_ID_PATTERN, name):
            raise ValueError(f"batch name {name!r}: use letters, digits and . _ : - (at most 128)")
        self.batches.begin(name, webhook)
        skipped = 0
        with tqdm(desc=f"enqueue {name}", unit="job", disable=not progress) as bar:
            for part in _chunks(jobs, chunk):
                validated = [_in_batch(j, name) for j in part]
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
                now = datetime.now(UTC).isoformat()
                self._send_many(
                    [(j.id, {**j.model_dump(mode="json", exclude_none=True), "submitted_at": now}) for j in send]
                )
                skipped += len(part) - len(send)
                bar.update(len(part))
                bar.set_postfix(already_succeeded=skipped, refresh=False)
        if self.batches.submitted(name):  # every job had already succeeded
            posting = self.batches.announce(name, self.settings.webhook_secret)
            if posting is not None:
                posting.join(60)  # this process may exit right after: let the POST finish
        return BatchHandle(self, name)

    def _send_many(self, jobs: list[tuple[str, dict[str, Any]]]) -> None:
        """Send already validated job JSON to the bulk queue: one Redis round trip for the ledger, then the messages."""
        if not jobs:
            return
        queue = self.settings.queue
        self.ledger.sent_many(jobs, queue)
        # kombu's publish batch: the messages go to Redis in one pipeline per 1,000, not one round trip each.
        # The queue is declared with the first message only (kombu re-binds it on every publish otherwise).
        with self.celery.producer_or_acquire() as producer, producer.batch(max_size=1000):
            for n, (job_id, payload) in enumerate(jobs):
                self.celery.send_task(
                    TASK_NAME,
                    args=[payload],
                    task_id=job_id,
                    queue=queue,
                    producer=producer,
                    argsrepr=_ARGSREPR,
                    kwargsrepr="{}",
                    declare=None if n == 0 else [],
                )

    def dead_letters(self) -> list[DeadLetter]:
        """Jobs of this client's queue that failed after exhausting their retries or crashing workers."""
        return self.ledger.dead_letters()

    def retry_failed(self, job_ids: Sequence[str] | None = None) -> list[str]:
        """Enqueue dead-lettered jobs again under their own ids (all of them, or `job_ids`); returns the ids sent.

        Their stored failed results are removed first, so `result()` waits for the new run.
        """
        wanted = None if job_ids is None else set(job_ids)
        sent = []
        for letter in self.dead_letters():
            job_id = letter.result.id
            if letter.message is not None or (wanted is not None and job_id not in wanted):
                continue  # a message with no usable id carries no job to run again
            self.forget(job_id)
            self.send_json(job_id, {**letter.job, "submitted_at": datetime.now(UTC).isoformat()})
            sent.append(job_id)
        return sent

    def forget(self, job_id: str) -> None:
        """Drop a job's stored result (Redis and S3) and bookkeeping, before it runs again from the start."""
        self.ledger.forget(job_id)
        AsyncResult(job_id, app=self.celery).forget()
        if self.settings.results_bucket:
            self.s3.delete_object(Bucket=self.settings.results_bucket, Key=self.settings.result_key(job_id))

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """The result of a job: from Redis while it is kept there, else from S3; waits up to `timeout` seconds.

        Raises:
            TimeoutError: no result yet after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        async_result: AsyncResult = AsyncResult(job_id, app=self.celery)
        checked_s3 = False
        while True:
            if async_result.state in _READY_STATES:
                return _from_meta(job_id, async_result.state, async_result.result)
            if not checked_s3:  # a result expired from Redis still lives in S3
                stored = read_result(self.s3, self.settings, job_id)
                if stored is not None:
                    return stored
                checked_s3 = True
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {job_id} has no result after {timeout} s (state {async_result.state}); "
                    f"is a worker consuming queue {self.settings.queue!r}? Run `vlmq result {job_id}` later"
                )
            time.sleep(0.05)

    def peek(self, job_id: str) -> JobResult | None:
        """The job's result if it has one now (Redis, then S3), else None. Never waits."""
        async_result: AsyncResult = AsyncResult(job_id, app=self.celery)
        if async_result.state in _READY_STATES:
            return _from_meta(job_id, async_result.state, async_result.result)
        return read_result(self.s3, self.settings, job_id)

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
            TimeoutError: some results did not arrive in time.
        """
        validated = [Job.model_validate(j) if isinstance(j, dict) else j for j in jobs]
        handles = [self.submit(job, priority=priority) for job in validated]
        return self.collect(
            [h.id for h in handles], progress=progress, timeout=timeout, poll_interval_s=poll_interval_s
        )

    def collect(
        self,
        job_ids: Sequence[str],
        *,
        progress: bool = True,
        timeout: float | None = None,
        poll_interval_s: float = 0.1,
    ) -> list[JobResult]:
        """Wait for the results of already submitted jobs, in the order of `job_ids`."""
        backend: Any = self.celery.backend  # the Redis backend's get_many is not in celery-types' stubs
        pending = list(dict.fromkeys(job_ids))
        done: dict[str, JobResult] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        failed = 0
        with tqdm(total=len(pending), desc="jobs", unit="job", disable=not progress) as bar:
            while pending:
                # One MGET per interval for every pending id; get_many yields what is ready, then times out.
                try:
                    for task_id, meta in backend.get_many(pending, timeout=poll_interval_s, interval=poll_interval_s):
                        result = _from_meta(str(task_id), meta["status"], meta["result"])
                        done[result.id] = result
                        failed += not result.ok
                        bar.update(1)
                        bar.set_postfix(failed=failed, refresh=False)
                except CeleryTimeoutError:
                    pass
                pending = [i for i in pending if i not in done]
                if pending and deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{len(pending)} of {len(job_ids)} jobs have no result after {timeout} s; "
                        f"first pending: {pending[0]}. Are workers consuming queue {self.settings.queue!r}?"
                    )
        return [done[i] for i in job_ids]
