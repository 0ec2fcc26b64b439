"""Named batches as a producer holds them: `BatchHandle` (status, results as JSONL, retry-failed, cancel); the counts
live in Redis (`producer.core.batches`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import IO, Protocol

from tqdm import tqdm

from producer.core.batches import BatchStatus, BatchStore, JobState
from producer.core.jobs import JobResult
from producer.core.publish import Publisher, again, now_iso
from producer.core.results import ResultReader
from producer.core.settings import SharedSettings
from producer.export import write_results

__all__ = ["BatchHandle", "BatchStatus", "BatchStore", "JobState"]


class BatchClient(Protocol):
    """What a `BatchHandle` uses of its `producer.Client`."""

    @property
    def settings(self) -> SharedSettings: ...

    @property
    def batches(self) -> BatchStore: ...

    @property
    def publisher(self) -> Publisher: ...

    @property
    def result_reader(self) -> ResultReader: ...

    def forget(self, job_id: str) -> None: ...


class BatchHandle:
    """A named batch: its status, its results as JSONL, and retry-failed / cancel."""

    def __init__(self, client: BatchClient, name: str) -> None:
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
        self.store.requeue(self.name, ids)
        for job_id in ids:
            self.client.forget(job_id)
        now = now_iso()
        self.client.publisher.publish([again(i, failed[i], now) for i in ids], self.client.settings.queue)
        self.store.close_submission(self.name)
        return ids

    def watch(self, interval_s: float = 1.0) -> BatchStatus:
        """Show a live progress bar (rate, ETA) on stderr until the batch ends; returns its last status."""
        status = self.status()
        with tqdm(total=status.total, initial=status.done, desc=status.name, unit="job") as bar:
            while True:
                bar.total = status.total
                bar.update(status.done - bar.n)
                bar.set_postfix(running=status.running, failed=status.failed, cancelled=status.cancelled)
                if status.status not in ("running", "submitting"):
                    return status
                time.sleep(interval_s)
                status = self.status()

    def write_results(self, path: str, errors_path: str) -> tuple[int, int, int]:
        """`results` into files: JSONL, or Parquet when `path` ends with `.parquet` (needs pyarrow).

        Raises:
            MissingExtra: Parquet output without pyarrow installed.
        """
        return write_results(self.results, path, errors_path)

    def ended(self, chunk: int = 500) -> Iterator[JobResult | None]:
        """Each job's result in input order, streamed `chunk` at a time from Redis (S3 for those expired there);
        None for a job with no result in this run yet."""
        for ids in self.store.ids(self.name, chunk):
            states = self.store.states(self.name, ids)
            # A job not ended in this run has no result yet: an older one would be stale.
            ended = [i for i, state in zip(ids, states, strict=True) if state in ("succeeded", "failed", "cancelled")]
            found = dict(zip(ended, self.client.result_reader.many(ended), strict=True))
            yield from (found.get(i) for i in ids)

    def results(self, out: IO[str], errors: IO[str] | None = None, chunk: int = 500) -> tuple[int, int, int]:
        """Write one JobResult JSON line per job in input order (failed ones to `errors` instead, when given).

        Streams `chunk` results at a time from Redis (S3 for those expired there). Returns (succeeded, failed,
        without a result yet).
        """
        counts = [0, 0, 0]
        for result in self.ended(chunk):
            if result is None:
                counts[2] += 1
                continue
            counts[0 if result.ok else 1] += 1
            target = out if result.ok or errors is None else errors
            target.write(result.model_dump_json() + "\n")
        return counts[0], counts[1], counts[2]
