"""Cancel a single job that no worker has taken yet: its message is taken back out of its queue.

kombu keeps a queue as Redis lists and a worker takes a message with BRPOP, so LREM of the message's exact bytes
succeeds for exactly one side: if it removes the message, no worker has it and none ever will; if it removes
nothing, a worker took it first (the job is running, or prefetched and about to) and it runs to its end. The job
then ends `cancelled` like a cancelled batch's jobs: a failed JobResult stored where workers store theirs (S3, then
Celery's result in Redis), and its end recorded in the ledger (so the lost-message recovery never sends it again)
and in its batch's counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from producer.broker import message_id, queue_lists
from producer.jobs import JobError, JobResult

if TYPE_CHECKING:
    from producer.client import Client

SCAN_CHUNK = 1000


def _take_back(client: Client, queue: str, job_id: str) -> bool:
    """Remove the job's message from `queue`'s lists; True if it was there (no worker has it)."""
    redis = client.ledger.redis
    for name in queue_lists(queue):
        start = 0
        while page := redis.lrange(name, start, start + SCAN_CHUNK - 1):
            for raw in page:
                if message_id(raw) == job_id:
                    return bool(redis.lrem(name, 1, raw))  # type: ignore[arg-type]  # bytes are accepted
            start += SCAN_CHUNK
    return False


def cancel_queued(client: Client, job_id: str, entry: dict[str, Any]) -> JobResult | None:
    """End the job `cancelled` if its message is still queued; returns its result, or None if a worker has it.

    `entry` is the job's ledger entry ({"job": ..., "queue": ...}).
    """
    queues = [entry["queue"]] if entry.get("queue") else client.settings.queues
    if not any(_take_back(client, queue, job_id) for queue in queues):
        return None
    job = entry.get("job") or {}
    metadata = job.get("metadata") if isinstance(job.get("metadata"), dict) else {}
    error = JobError(code="cancelled", message="the job was cancelled before it started", retryable=False)
    result = JobResult(id=job_id, status="failed", error=error, attempts=0, metadata=metadata)
    client.result_store.write(result)
    client.celery.backend.store_result(job_id, result.model_dump(mode="json"), "SUCCESS")
    client.ledger.record_finished(result)
    if job.get("batch"):
        client.batches.record_finished(str(job["batch"]), job_id, "cancelled")
    return result
