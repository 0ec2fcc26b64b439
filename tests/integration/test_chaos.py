"""Every fault at once, and nothing lost: 2,000 jobs (images, videos, two named batches, jobs through the HTTP API,
other clients' messages, short TTLs, invalid jobs and poison) against 3 workers on the tiny model, while a seeded
schedule SIGKILLs a worker three times, a preprocessing process once and an engine's process once, restarts Redis,
takes S3 down for 30 s and stalls a consumer, overlapping. A supervisor thread starts a worker in the place of any
that exits, as systemd or Kubernetes would.

Afterwards: every job has exactly one final JobResult, the same in Redis and in S3, with the outcome its kind must
have; no job ran to success twice; each batch's counts add up and its end was announced once; the dead letters hold
exactly the poison. The schedule's seed is `VLMQ_CHAOS_SEED` (a fixed default): a failing seed is reproducible, and
any seed must pass. `VLMQ_CHAOS_JOBS=20000` runs the same test as a soak.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import Job, JobResult
from tests.apiserver import start_api
from tests.chaos import SEED, Chaos, schedule
from tests.conftest import MEDIA_BUCKET, RESULTS_BUCKET, Stack
from tests.helpers import RECEIVED, SUCCEEDED, celery_call, count_in_logs, publish, push_envelope, results_ready
from tests.integration.test_batches import webhook_server
from tests.reference import encode, make_clip, random_image
from worker.devtools.local_services import RedisServer, SeaweedS3, free_port

JOBS = int(os.environ.get("VLMQ_CHAOS_JOBS", "2000"))
WORKERS = 3
WINDOW_S = 80.0  # the faults fall within this many seconds of the jobs being sent
DEADLINE_S = 300.0
ENV = {
    "VLMQ_VISIBILITY_TIMEOUT_S": "20",  # a killed worker's jobs come back after 20 s
    "VLMQ_RETRY_BACKOFF_S": "1",
    "VLMQ_RETRY_BACKOFF_MAX_S": "5",
    "VLMQ_MAX_RETRIES": "15",  # 15 retries of up to 5 s outlast the 30 s S3 outage
    "VLMQ_MAX_CRASHES": "5",  # more than the faults that kill jobs' processes: only poison reaches it
    "VLMQ_RECOVER_INTERVAL_S": "5",
    "VLMQ_BROKER_CONNECT_TIMEOUT_S": "5",
    "VLMQ_WEBHOOK_SECRET": "chaos",
    "VLMQ_FAULTS": json.dumps({"preprocess_crash_on": "poison-crash"}),
}
WORKER_ARGS = ("--max-batch-size", "8", "--max-wait-ms", "20", "--preprocess-workers", "1")


@pytest.fixture
def chaos_stack(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A Redis and a SeaweedFS of this test's own, which it restarts and stops."""
    redis_server = RedisServer(tmp_path / "redis").start()
    s3 = SeaweedS3(tmp_path / "seaweedfs").start()
    for bucket in (MEDIA_BUCKET, RESULTS_BUCKET):
        s3.create_bucket(bucket)
    stack = Stack(redis=redis_server, s3=s3, model=tiny_model, workdir=tmp_path)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, stack.env[name])
    try:
        yield stack
    finally:
        stack.stop_workers()
        s3.stop()
        redis_server.stop()


def media(stack: Stack) -> tuple[list[str], str, str]:
    """40 images, a clip, and an image whose preparation kills the process preparing it (the poison)."""
    s3 = stack.s3.client()
    images = []
    for i in range(40):
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"chaos/{i}.png", Body=encode(random_image(48, 32, seed=i), "PNG"))
        images.append(f"s3://{MEDIA_BUCKET}/chaos/{i}.png")
    s3.put_object(
        Bucket=MEDIA_BUCKET, Key="chaos/clip.mp4", Body=make_clip(frames=16, width=32, height=32, fps=8, seed=2)
    )
    s3.put_object(Bucket=MEDIA_BUCKET, Key="chaos/poison-crash.png", Body=encode(random_image(8, 8, seed=9), "PNG"))
    return images, f"s3://{MEDIA_BUCKET}/chaos/clip.mp4", f"s3://{MEDIA_BUCKET}/chaos/poison-crash.png"


def send_all(stack: Stack, webhook: str) -> dict[str, dict[str, str]]:
    """Every kind of job; returns kind -> {job id: the outcome it must end with}."""
    images, clip, poison = media(stack)
    client = stack.client()
    sent: dict[str, dict[str, str]] = {}

    def image(i: int, **fields: object) -> Job:
        return Job(media=[images[i % len(images)]], max_new_tokens=1, **fields)  # type: ignore[arg-type]

    api = start_api(stack)
    with api.client() as http:
        answers = [http.post("/jobs", json=image(i).model_dump(mode="json", exclude_none=True)) for i in range(100)]
    assert [a.status_code for a in answers] == [202] * 100
    sent["api"] = {a.json()["id"]: "succeeded" for a in answers}
    for name in ("chaos-a", "chaos-b"):
        batch = [image(i) for i in range(100)]
        client.submit_batch(name, batch, webhook=webhook, progress=False)
        sent[name] = {j.id: "succeeded" for j in batch}
    sent["ttl"] = {client.submit(image(i, ttl_s=0.001)).id: "expired" for i in range(10)}
    sent["poison"] = {client.submit(Job(media=[poison], max_new_tokens=1)).id: "worker_lost" for _ in range(2)}
    sent["foreign"], sent["invalid"] = {}, {}
    for i in range(20):  # another Celery client (protocol 2), and a Go one writing kombu's layout (gocelery)
        job = {"task": "caption", "media": [images[i % len(images)]], "max_new_tokens": 1}
        task_id = f"foreign-{uuid.uuid4().hex[:12]}"
        if i % 2:
            publish(stack, stack.queue, celery_call(job), {"task": "vlmq.run", "id": task_id})
        else:
            push_envelope(stack, stack.queue, gocelery(task_id, job))
        sent["foreign"][task_id] = "succeeded"
    for i in range(5):  # a question-answering job without its question: fails alone
        task_id = f"invalid-{uuid.uuid4().hex[:12]}"
        publish(
            stack, stack.queue, celery_call({"task": "qa", "media": [images[i]]}), {"task": "vlmq.run", "id": task_id}
        )
        sent["invalid"][task_id] = "invalid_job"
    for _ in range(4):  # no usable id: only the dead letters can keep them
        publish(stack, stack.queue, celery_call({"task": "caption", "media": [images[0]]}), {"task": "vlmq.run"})
    bulk = JOBS - sum(len(ids) for ids in sent.values())
    videos = [
        Job(task="qa", media=[clip], question="What moves?", num_frames=4, max_new_tokens=1) for _ in range(bulk // 20)
    ]
    jobs = [*videos, *(image(i, metadata={"n": str(i)}) for i in range(bulk - len(videos)))]
    sent["bulk"] = {client.submit(j, priority="bulk").id: "succeeded" for j in jobs}
    api.stop()
    return sent


def gocelery(task_id: str, job: dict[str, object]) -> dict[str, object]:
    """gocelery's envelope: protocol 1 in the body, no headers, exchange and routing key `celery`."""
    import base64

    body = json.dumps({"id": task_id, "task": "vlmq.run", "args": [job], "kwargs": {}}).encode()
    return {
        "body": base64.b64encode(body).decode(),
        "content-type": "application/json",
        "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                       "delivery_info": {"exchange": "celery", "routing_key": "celery"}},
    }  # fmt: skip


def test_every_fault_at_once_loses_nothing_and_runs_nothing_twice(chaos_stack: Stack) -> None:
    stack = chaos_stack
    port = iter(range(free_port(), 45000))
    chaos = Chaos(
        stack, stack.redis, stack.s3,  # type: ignore[arg-type]
        start=lambda: stack.start_worker(*WORKER_ARGS, "--metrics-port", str(next(port)), env=ENV, ready_count=0),
        workers=WORKERS,
    )  # fmt: skip
    faults = schedule(SEED, WINDOW_S, WORKERS)
    with webhook_server() as (url, received):
        chaos.begin()
        sent = send_all(stack, url)
        started = time.monotonic()
        chaos.run(faults, started)
        ids = [i for kind in sent.values() for i in kind]
        deadline = started + DEADLINE_S
        done = 0
        while (done := ended(stack, ids, done)) < len(ids) and time.monotonic() < deadline:
            time.sleep(1)
        took = time.monotonic() - started
        time.sleep(max(0.0, started + WINDOW_S + 35 - time.monotonic()))  # every fault applied and over
        chaos.stop()
        hooks = Counter(json.loads(body)["batch"]["name"] for _, body in received)

    print(f"\nchaos seed {SEED}: {len(ids)} jobs, {done} ended in {took:.0f} s; {chaos.restarts} worker starts "
          f"after the first {WORKERS}")  # fmt: skip
    print("\n".join(chaos.applied))
    assert done == len(ids), f"{len(ids) - done} jobs have no result after {DEADLINE_S:g} s"
    client = stack.client()
    in_redis = redis_results(stack, ids)
    mismatched = [i for i in ids if in_redis[i] is None or client.result_store.read(i) != in_redis[i]]
    outcomes = {kind: Counter(outcome(in_redis[i]) for i in job_ids) for kind, job_ids in sent.items()}
    expected = {kind: Counter(job_ids.values()) for kind, job_ids in sent.items()}
    runs = count_in_logs(stack, SUCCEEDED)
    letters = client.ledger.dead_letters()
    print(f"outcomes: {outcomes}")
    received_twice = sum(1 for n in count_in_logs(stack, RECEIVED).values() if n > 1)
    print(f"dead letters: {len(letters)}; batches announced: {dict(hooks)}; received more than once: {received_twice}")
    first = mismatched[0] if mismatched else None
    assert mismatched == [], (
        f"{len(mismatched)} results differ between Redis and S3, e.g.\nRedis: {in_redis[first]}\n"
        f"S3:    {client.result_store.read(first) if first else None}"
    )
    assert outcomes == expected
    assert sorted(i for i, n in runs.items() if n > 1) == []  # no job ran to success twice
    assert sorted(d.result.id for d in letters if d.message is None) == sorted(sent["poison"])
    assert sum(1 for d in letters if d.message is not None) == 4  # the messages without a usable id
    for name in ("chaos-a", "chaos-b"):
        status = client.batch(name).status()
        assert (status.total, status.succeeded, status.failed, status.queued, status.running) == (100, 100, 0, 0, 0)
    assert hooks == {"chaos-a": 1, "chaos-b": 1}


def ended(stack: Stack, ids: list[str], last: int) -> int:
    """How many jobs have their result in Redis; `last` while Redis restarts (one of the faults)."""
    try:
        return results_ready(stack, ids)
    except redis.RedisError:  # refused, or still loading its data
        return last


def redis_results(stack: Stack, ids: list[str]) -> dict[str, JobResult | None]:
    """Each job's result as Celery's result backend holds it in Redis (not S3's copy)."""
    metas = redis.Redis.from_url(stack.redis.url).mget([f"celery-task-meta-{i}" for i in ids])
    return {
        i: JobResult.model_validate(json.loads(m)["result"]) if m is not None else None
        for i, m in zip(ids, metas, strict=True)
    }


def outcome(result: JobResult | None) -> str:
    if result is None:
        return "none"
    return "succeeded" if result.ok else result.error.code if result.error else "failed"


def test_the_schedule_is_the_seeds_and_holds_every_fault() -> None:
    faults = schedule(7, WINDOW_S, WORKERS)
    assert faults == schedule(7, WINDOW_S, WORKERS)
    assert Counter(f.kind for f in faults) == {
        "kill-worker": 3, "kill-preprocess": 1, "restart-redis": 1, "s3-outage": 1, "kill-engine": 1,
        "stall-consumer": 1,
    }  # fmt: skip
    assert all(3 <= f.at_s <= WINDOW_S for f in faults) and schedule(8, WINDOW_S, WORKERS) != faults
