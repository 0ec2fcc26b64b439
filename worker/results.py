"""The worker's side of the result store (`producer/results.py`): a failed write ends as `ResultWriteFailed`."""

from __future__ import annotations

from producer import results
from producer.errors import ResultWriteError
from producer.jobs import JobResult
from worker.errors import ResultWriteFailed


class ResultStore(results.ResultStore):
    """`producer.results.ResultStore`, whose failed writes raise the job error `ResultWriteFailed` (retryable)."""

    def write(self, result: JobResult) -> str | None:
        try:
            return super().write(result)
        except ResultWriteError as exc:
            raise ResultWriteFailed(str(exc)) from None
