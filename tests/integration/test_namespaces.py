"""Two deployments with different VLMQ_REDIS_NAMESPACE share one Redis without sharing state."""

from __future__ import annotations

import uuid

from producer import JobResult
from producer.core.batches import BatchStore
from producer.core.ledger import Ledger
from producer.settings import ClientSettings
from tests.conftest import Stack


def ledger(stack: Stack, namespace: str) -> Ledger:
    return Ledger(ClientSettings(broker_url=stack.redis.url, queue=stack.queue, redis_namespace=namespace))


def test_a_job_that_succeeded_in_one_namespace_is_unknown_in_another(stack: Stack) -> None:
    job_id = f"ns-{uuid.uuid4().hex}"
    a, b = ledger(stack, "ns-a"), ledger(stack, "ns-b")
    a.record_sent([(job_id, {"id": job_id})], stack.queue)
    a.record_finished(JobResult(id=job_id, status="succeeded", text="a cat"))

    assert a.has_succeeded(job_id) is True
    assert b.has_succeeded(job_id) is False
    assert b.known_many([job_id]) == [None]
    assert b.record_started(job_id, retries=0) == (1, False)  # B runs it, as its first start


def test_pending_jobs_dead_letters_and_batches_stay_in_their_namespace(stack: Stack) -> None:
    job_id = f"ns-{uuid.uuid4().hex}"
    a, b = ledger(stack, "ns-a"), ledger(stack, "ns-b")
    a.record_sent([(job_id, {"id": job_id})], stack.queue)
    error = {"code": "media_not_found", "message": "m", "retryable": False}
    failed = JobResult.model_validate({"id": job_id, "status": "failed", "error": error})
    a.dead_letter({"id": job_id}, failed)
    batch = f"batch-{uuid.uuid4().hex[:8]}"
    BatchStore(a.redis, a.keys).begin(batch, None)

    assert a.known_many([job_id]) == ["pending"] and b.known_many([job_id]) == [None]
    assert [d.result.id for d in a.dead_letters()] == [job_id] and b.dead_letters() == []
    assert BatchStore(a.redis, a.keys).status(batch).status == "submitting"
    assert BatchStore(b.redis, b.keys).status(batch).status == "unknown"
