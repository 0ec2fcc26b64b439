"""Job results, read and written in one place.

A result lives in two places: Celery's result in Redis (the fast path, until `VLMQ_RESULT_EXPIRES_S`) and the S3
object `<VLMQ_RESULTS_PREFIX><job id>.json` (the durable record, written by the worker that ran the job).

- `ResultStore`: the S3 objects; workers write them, producers read them. One id rule for both.
- `from_celery`: a `JobResult` from Celery's result meta.
- `ResultReader`: Redis first, then S3, for one job now (`peek`), one job waited for (`wait`), many jobs now
  (`many`, in input order) or many waited for (`collect`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from tqdm import tqdm

from producer.core.errors import ResultTimeout, ResultWriteError
from producer.core.jobs import JOB_ID_PATTERN, ErrorCode, JobError, JobResult
from producer.core.settings import SharedSettings

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
_NOT_FOUND = ("NoSuchKey", "404", "NotFound")


class ResultStore:
    """The durable record of results, in S3. A PutObject replaces the whole object at once: readers never see half.

    Without a results bucket nothing is stored. A job id outside the contract (a message sent around the client)
    never names an S3 key: such results stay in Redis only.
    """

    def __init__(self, s3_client: Any, settings: SharedSettings) -> None:
        self.s3 = s3_client
        self.settings = settings
        self.bucket = settings.results_bucket

    def key(self, job_id: str) -> str | None:
        """The S3 key of the job's result object; None without a bucket or for an id outside the contract."""
        if not self.bucket or not re.fullmatch(JOB_ID_PATTERN, job_id):
            return None
        return self.settings.result_key(job_id)

    def read(self, job_id: str) -> JobResult | None:
        """The job's result object, or None if it has not been written (or cannot be)."""
        key = self.key(job_id)
        if key is None:
            return None
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                return None
            raise
        return JobResult.model_validate_json(body)

    def write(self, result: JobResult) -> str | None:
        """Store `result`; returns its s3:// URI, or None when it has no key.

        Raises:
            ResultWriteError: S3 refused or could not be reached.
        """
        key = self.key(result.id)
        if key is None:
            return None
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=result.model_dump_json().encode(),
                ContentType="application/json",
            )
        except (ClientError, BotoCoreError) as exc:
            raise ResultWriteError(f"could not write s3://{self.bucket}/{key}: {exc}") from None
        return f"s3://{self.bucket}/{key}"

    def delete(self, job_id: str) -> None:
        """Remove the job's result object, if it can have one (deleting a missing object is not an error in S3)."""
        key = self.key(job_id)
        if key is not None:
            self.s3.delete_object(Bucket=self.bucket, Key=key)


def from_celery(job_id: str, state: str, value: Any) -> JobResult:
    """A JobResult from a Celery result: the task's return value, or a failed result for a crashed task."""
    if state == "SUCCESS" and isinstance(value, dict):
        return JobResult.model_validate(value)
    code: ErrorCode = "cancelled" if state == "REVOKED" else "internal"
    message = f"the task ended {state} without a result: {value!r}. Check the worker's log for job {job_id}"
    return JobResult(id=job_id, status="failed", error=JobError(code=code, message=message, retryable=False))


def _ready(job_id: str, meta: dict[str, Any] | None) -> JobResult | None:
    """The result in a Celery result meta, or None while the task has not ended (or Redis no longer keeps it)."""
    if meta is not None and meta.get("status") in READY_STATES:
        return from_celery(job_id, meta["status"], meta["result"])
    return None


class ResultReader:
    """Reads results from Celery's Redis result backend while it keeps them, else from the S3 record."""

    def __init__(self, celery: Celery, store: ResultStore) -> None:
        self.celery = celery
        self.store = store

    @property
    def _backend(self) -> Any:  # Celery's backend is per thread; the Redis one's methods are not in the stubs
        return self.celery.backend

    def peek(self, job_id: str) -> JobResult | None:
        """The job's result if it has one now (Redis, then S3), else None. Never waits."""
        result = _ready(job_id, self._backend.get_task_meta(job_id))
        return result if result is not None else self.store.read(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobResult:
        """The job's result, waiting up to `timeout` seconds (None: for ever).

        Raises:
            ResultTimeout: no result yet after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        result = self.peek(job_id)  # S3 is read once: a result expired from Redis is there already, or never
        while result is None:
            if deadline is not None and time.monotonic() >= deadline:
                state = self._backend.get_task_meta(job_id)["status"]
                raise ResultTimeout(
                    f"job {job_id} has no result after {timeout} s (state {state}); "
                    f"is a worker consuming queue {self.store.settings.queue!r}? Run `vlmq result {job_id}` later"
                )
            time.sleep(0.05)
            result = _ready(job_id, self._backend.get_task_meta(job_id))
        return result

    def many(self, job_ids: Sequence[str]) -> list[JobResult | None]:
        """Each job's result now, in the order of `job_ids`: one Redis MGET, then S3 for those not in Redis."""
        if not job_ids:
            return []
        backend = self._backend
        metas = backend.client.mget([backend.get_key_for_task(i) for i in job_ids])
        results = []
        for job_id, raw in zip(job_ids, metas, strict=True):
            result = _ready(job_id, backend.decode_result(raw) if raw else None)
            results.append(result if result is not None else self.store.read(job_id))
        return results

    def collect(self, ids: Sequence[str], progress: bool, timeout: float | None, interval_s: float) -> list[JobResult]:
        """Wait for the results of already submitted jobs (Redis only), in the order of `ids`; `progress` shows a
        bar, Redis is polled every `interval_s`.

        Raises:
            ResultTimeout: some results did not arrive within `timeout` seconds.
        """
        pending = list(dict.fromkeys(ids))
        done: dict[str, JobResult] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        failed = 0
        with tqdm(total=len(pending), desc="jobs", unit="job", disable=not progress) as bar:
            while pending:
                for result in self._ready_now(pending, interval_s):
                    done[result.id] = result
                    failed += not result.ok
                    bar.update(1)
                    bar.set_postfix(failed=failed, refresh=False)
                pending = [i for i in pending if i not in done]
                if pending and deadline is not None and time.monotonic() >= deadline:
                    raise ResultTimeout(
                        f"{len(pending)} of {len(ids)} jobs have no result after {timeout} s; "
                        f"first pending: {pending[0]}. Are workers consuming queue {self.store.settings.queue!r}?"
                    )
        return [done[i] for i in ids]

    def _ready_now(self, pending: list[str], poll_interval_s: float) -> Iterator[JobResult]:
        # One MGET per interval for every pending id; get_many yields what is ready, then times out.
        try:
            for task_id, meta in self._backend.get_many(pending, timeout=poll_interval_s, interval=poll_interval_s):
                yield from_celery(str(task_id), meta["status"], meta["result"])
        except CeleryTimeoutError:
            pass
