"""Cancel a single job that no worker has taken yet: its message is taken back out of its queue.

kombu keeps a queue as Redis lists and a worker takes a message with BRPOP, so LREM of the message's exact bytes
succeeds for exactly one side: if it removes the message, no worker has it and none ever will; if it removes
nothing, a worker took it first (the job is running, or prefetched and about to) and it runs to its end. The job
then ends `cancelled` through the one path every ending takes (producer/core/endings.py): a failed JobResult in S3 and
Celery's backend, its end in the ledger (so the lost-message recovery never sends it again) and in its batch's
counts, which announce the batch when this was its last job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from producer.core.broker import message_id, queue_lists
from producer.core.endings import Endings
from producer.core.jobs import JobError, JobResult

SCAN_CHUNK = 1000


def _take_back(redis: Any, queue: str, job_id: str) -> bool:
    """Remove the job's message from `queue`'s lists; True if it was there (no worker has it)."""
    for name in queue_lists(queue):
        start = 0
        while page := redis.lrange(name, start, start + SCAN_CHUNK - 1):
            for raw in page:
                if message_id(raw) == job_id:
                    return bool(redis.lrem(name, 1, raw))
            start += SCAN_CHUNK
    return False


def cancel_queued(endings: Endings, queues: Sequence[str], job_id: str, entry: dict[str, Any]) -> JobResult | None:
    """End the job `cancelled` if its message is still queued; returns its result, or None if a worker has it.

    `entry` is the job's ledger entry ({"job": ..., "queue": ...}); `queues` are looked in when it names none.
    """
    redis = endings.ledger.redis
    if not any(_take_back(redis, queue, job_id) for queue in ([entry["queue"]] if entry.get("queue") else queues)):
        return None
    job = entry.get("job") or {}
    metadata = job.get("metadata") if isinstance(job.get("metadata"), dict) else {}
    error = JobError(code="cancelled", message="the job was cancelled before it started", retryable=False)
    result = JobResult(id=job_id, status="failed", error=error, attempts=0, metadata=metadata)
    endings.record(result, job, to_backend=True)
    return result
