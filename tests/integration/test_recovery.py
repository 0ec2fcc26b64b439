"""Lost messages are sent again, and only lost ones: `worker/recovery.py` against a real Redis and worker."""

from __future__ import annotations

import json

import redis

from producer import Job
from tests.conftest import Stack
from tests.helpers import count_in_logs, upload_images
from worker.recovery import Recovery


def recorder() -> tuple[list[str], object]:
    sent: list[str] = []

    def send(job_id: str, job: dict, queue: str | None, force: bool) -> None:
        sent.append(job_id)

    return sent, send


def test_only_jobs_whose_message_is_gone_are_sent_again(stack: Stack) -> None:
    client = stack.client()
    r = redis.Redis.from_url(stack.redis.url)
    jobs = [Job(id=f"rec-{n}-{stack.queue}", media=["s3://m/x.png"]) for n in "abc"]
    a, b, c = (client.submit(job, priority="bulk").id for job in jobs)
    sent, send = recorder()
    now = [1000.0]
    recovery = Recovery(client.ledger, send, interval_s=10, clock=lambda: now[0])

    def sweep_at(t: float) -> list[str]:
        now[0] = t
        return recovery.sweep()

    assert sweep_at(1000) == [] and sent == []  # nothing popped yet: nothing to look at

    # `a` (the oldest) pushed back to the tail, as reject(requeue=True) does: popped before `b`, but queued.
    raw_a = r.rpop(stack.queue)
    r.lpush(stack.queue, raw_a)
    assert sweep_at(1001) == []  # missing from unacked once: not yet confirmed
    assert sweep_at(1011) == []  # confirmed missing, but found in the queue: it takes a new place in the order
    assert r.zscore(client.ledger.pending_key, a) > r.zscore(client.ledger.pending_key, c)

    # `b` popped by a live worker: its message is in kombu's unacknowledged hash.
    raw_b = r.rpop(stack.queue)
    r.hset("unacked", f"tag-{b}", json.dumps([json.loads(raw_b), "", stack.queue]))
    # `c` popped by a worker that died before recording it: lost.
    r.rpop(stack.queue)
    assert sweep_at(1020) == []
    assert sweep_at(1025) == []  # less than one interval since it was first missed
    assert sweep_at(1031) == [c]
    assert sent == [c]
    r.hdel("unacked", f"tag-{b}")


def test_a_message_lost_between_pop_and_unacked_is_run_by_the_worker(stack: Stack) -> None:
    uris = upload_images(stack, "recover", 3)
    client = stack.client()
    ids = [client.submit(Job(media=[u], max_new_tokens=4), priority="bulk").id for u in uris]
    # A worker popped the first job's message and died before kombu recorded it as unacknowledged.
    r = redis.Redis.from_url(stack.redis.url)
    assert json.loads(r.rpop(stack.queue))["headers"]["id"] == ids[0]

    stack.start_worker("--max-batch-size", "4", env={"VLMQ_RECOVER_INTERVAL_S": "1"})
    results = client.collect(ids, progress=False, timeout=120)

    assert [(res.id, res.status) for res in results] == [(i, "succeeded") for i in ids]
    assert count_in_logs(stack, r"job (\S+): its message was lost") == {ids[0]: 1}
    assert r.zcard(client.ledger.pending_key) == 0 and r.hlen(client.ledger.payloads_key) == 0
