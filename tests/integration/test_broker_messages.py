"""Messages published straight to the broker with kombu, past every vlmq client: each ends in exactly one outcome
(a failed result under its task id, or, with no usable id, a dead letter), the job sent after each succeeds, and
the worker process never restarts. Then the two ways a worker can still be stopped by a message: one that kills the
consumer (dead-lettered after VLMQ_MAX_CRASHES deaths) and one that wedges it (/livez fails).
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from producer import Job
from producer.core.broker import queue_lists
from producer.core.results import ResultStore
from tests.conftest import Stack
from tests.helpers import (
    ALLOWED_HOST,
    FAST_REDELIVERY,
    FirstBusy,
    celery_call,
    publish,
    push_envelope,
    scrape,
    serve,
    supervise,
    upload_images,
)
from tests.reference import encode, random_image
from worker.devtools.local_services import free_port

MAX_MESSAGE_BYTES = 4096


def test_every_broker_message_ends_in_one_outcome_and_the_worker_carries_on(stack: Stack) -> None:
    [uri] = upload_images(stack, "messages", 1)
    job = {"task": "caption", "media": [uri], "max_new_tokens": 4}
    port = free_port()
    worker = stack.start_worker(
        "--max-batch-size", "4", "--metrics-port", str(port), env={"VLMQ_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)}
    )
    client = stack.client()
    bulk, interactive = stack.queue, f"{stack.queue}-interactive"
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    # kind -> (expected code; "succeeded": admitted and run; None: no usable id, a dead letter), headers, body,
    # content type
    v2 = {"task": "vlmq.run"}
    cases: dict[str, tuple[str | None, dict[str, Any], bytes, str]] = {
        "kwargs null (celery-node)": ("succeeded", v2, celery_call(job, kwargs=None), "application/json"),
        "the job as keyword argument": (
            "succeeded",
            v2,
            json.dumps([[], {"job": job}, {}]).encode(),
            "application/json",
        ),
        "timelimit header not a pair": (
            "succeeded",
            {**v2, "timelimit": [1, 2, 3]},
            celery_call(job),
            "application/json",
        ),
        "ignore_result header": ("succeeded", {**v2, "ignore_result": True}, celery_call(job), "application/json"),
        "a callback in the embed": (
            "succeeded",
            v2,
            celery_call(job, embed={"callbacks": [{"task": "tasks.add", "args": [1]}]}),
            "application/json",
        ),
        "kombu-typed object in the embed": (
            "invalid_job",
            v2,
            celery_call(job, embed={"chord": {"__type__": "datetime", "__value__": "2020-01-01"}}),
            "application/json",
        ),
        "body an object": ("invalid_job", v2, b'{"not": "a job"}', "application/json"),
        "body [args, kwargs]": ("invalid_job", v2, json.dumps([[job], {}]).encode(), "application/json"),
        "body null": ("invalid_job", v2, b"null", "application/json"),
        "body a number": ("invalid_job", v2, b"5", "application/json"),
        "body a string": ("invalid_job", v2, b'"abc"', "application/json"),
        "embed a string": ("invalid_job", v2, celery_call(job, embed="x"), "application/json"),
        "args not a list": ("invalid_job", v2, json.dumps([job, {}, {}]).encode(), "application/json"),
        "kwargs not an object": ("invalid_job", v2, celery_call(job, kwargs=[1]), "application/json"),
        "extra argument": ("invalid_job", v2, json.dumps([[job, 1], {}, {}]).encode(), "application/json"),
        "unknown keyword argument": ("invalid_job", v2, celery_call(job, kwargs={"colour": "red"}), "application/json"),
        "unknown task name": ("invalid_job", {"task": "tasks.add"}, celery_call(job), "application/json"),
        "body over the size cap": (
            "invalid_job",
            v2,
            celery_call({**job, "prompt": "x" * MAX_MESSAGE_BYTES}),
            "application/json",
        ),
        "compression that does not fit": (
            "invalid_job",
            {**v2, "compression": "application/x-gzip"},
            celery_call(job),
            "application/json",
        ),
        "YAML content type": ("invalid_job", v2, b"- - task: caption\n", "application/x-yaml"),
        "pickle content type": ("invalid_job", v2, b"\x80\x04K\x05.", "application/x-python-serialize"),
        "non-UTF-8 bytes": ("invalid_job", v2, b'[["\xff\xfe"], {}, {}]', "application/json"),
        "invalid eta": ("invalid_job", {**v2, "eta": "tomorrow"}, celery_call(job), "application/json"),
        "Celery expires in the past": ("expired", {**v2, "expires": past}, celery_call(job), "application/json"),
        "protocol 1 with args not a list": (
            "invalid_job",
            {},
            json.dumps({"task": "vlmq.run", "args": "x", "kwargs": {}}).encode(),
            "application/json",
        ),
        "no id header": (None, v2, celery_call(job), "application/json"),
        "id header a number": (None, {**v2, "id": 42}, celery_call(job), "application/json"),
        "no task header, body not protocol 1": (None, {}, celery_call(job), "application/json"),
        "protocol 1 without an id": (
            None,
            {},
            json.dumps({"task": "vlmq.run", "args": [job], "kwargs": {}}).encode(),
            "application/json",
        ),
    }

    sent: dict[str, tuple[str, str]] = {}  # kind -> (bad message's id or "", good job's id)
    for n, (kind, (_, headers, body, content_type)) in enumerate(cases.items()):
        queue, priority = (bulk, "bulk") if n % 2 else (interactive, "interactive")
        task_id = str(uuid.uuid4())
        headers = dict(headers)
        if kind.startswith("protocol 1") and "without" not in kind:
            body = json.dumps({**json.loads(body), "id": task_id}).encode()
        elif "id" not in headers and not kind.startswith(("no ", "protocol 1")):
            headers["id"] = task_id
        publish(stack, queue, body, headers, content_type)
        good = client.submit(Job.model_validate({**job, "metadata": {"after": kind}}), priority=priority)  # type: ignore[arg-type]
        sent[kind] = (task_id, good.id)
    # Envelopes written into kombu's Redis list by hand, as clients that speak the Redis layout do, that kombu itself
    # cannot handle: headers that are not an object; no exchange in delivery_info.
    body = base64.b64encode(celery_call(job)).decode()
    properties = {"body_encoding": "base64", "delivery_info": {"exchange": "", "routing_key": bulk}}
    envelopes = [
        {"body": body, "content-type": "application/json", "headers": "not an object", "properties": properties},
        {
            "body": body,
            "content-type": "application/json",
            "headers": {"task": "vlmq.run", "id": str(uuid.uuid4())},
            "properties": {**properties, "delivery_info": {"routing_key": bulk}},
        },
    ]
    for n, envelope in enumerate(envelopes):
        envelope["properties"] = {**envelope["properties"], "delivery_tag": f"tag-{n}-{uuid.uuid4()}"}
        push_envelope(stack, bulk, envelope)
    redis.Redis.from_url(stack.redis.url).lpush(bulk, b"not json at all")  # an item that is not even JSON
    last = client.submit(Job.model_validate(job), priority="bulk")  # type: ignore[arg-type]

    goods = client.collect([g for _, g in sent.values()] + [last.id], progress=False, timeout=300)
    outcomes: dict[str, tuple[str, str | None]] = {}
    for kind, (task_id, _) in sent.items():
        if cases[kind][0] is None:
            continue
        result = client.result(task_id, timeout=30)
        outcomes[kind] = (result.status, result.error.code if result.error else None)
    letters = [d for d in client.dead_letters() if d.message is not None]
    metrics = scrape(port)
    log = worker.log_path.read_text(errors="replace")

    print()
    for kind, got in outcomes.items():
        print(f"{kind:<40} {got[1]}")
    restarts = log.count("loaded model") - 1
    kinds = len(cases) + len(envelopes) + 1
    print(f"broker messages: {kinds} kinds, {len(letters)} dead letters, worker restarts {restarts}")

    assert outcomes == {
        kind: ("succeeded", None) if code == "succeeded" else ("failed", code)
        for kind, (code, *_) in cases.items()
        if code is not None
    }
    assert [r.status for r in goods] == ["succeeded"] * (len(cases) + 1)
    assert "Restoring" not in log and "Connection to broker lost" not in log  # no message made kombu reconnect
    assert {r.worker for r in goods} == {f"{socket.gethostname()}:{worker.proc.pid}"}
    assert worker.proc.poll() is None and log.count("loaded model") == 1
    # Without a usable id: one dead letter each (the 4 kinds, and the envelopes kombu cannot read), body kept.
    without_id = sum(1 for code, *_ in cases.values() if code is None)
    assert len(letters) == without_id + len(envelopes) + 1
    assert all(d.result.id.startswith("message:") and d.result.error.code == "invalid_job" for d in letters)  # type: ignore[union-attr]
    kept = [d.message["body"] for d in letters if d.message is not None]
    not_json = [body for body in kept if "not json at all" in body]
    bodies = [body.decode() for code, _, body, _ in cases.values() if code is None]
    assert len(not_json) == 1
    rest = [body for body in kept if body not in not_json]
    assert sorted(rest) == sorted(bodies + [json.dumps(envelope) for envelope in envelopes])
    # Every refusal with an id is a result in Redis and in S3 too, and counted in the metrics.
    s3_client = stack.s3.client()
    settings = client.settings
    for kind, (task_id, _) in sent.items():
        if cases[kind][0] is not None:
            stored = ResultStore(s3_client, settings).read(task_id)
            code = stored.error.code if stored is not None and stored.error is not None else "succeeded"
            assert stored is not None and code == cases[kind][0], kind
    invalid = sum(1 for code, *_ in cases.values() if code == "invalid_job")
    assert metrics[("vlmq_jobs_total", (("code", "invalid_job"), ("status", "failed")))] == (
        invalid + without_id + len(envelopes) + 1
    )
    admitted = sum(1 for code, *_ in cases.values() if code == "succeeded")
    assert metrics[("vlmq_jobs_total", (("code", ""), ("status", "succeeded")))] == len(goods) + admitted
    assert metrics[("vlmq_jobs_total", (("code", "expired"), ("status", "failed")))] == 1


def test_a_message_that_kills_the_consumer_is_dead_lettered_after_max_crashes(stack: Stack) -> None:
    uris = upload_images(stack, "consumer-crash", 4)
    env = {
        **FAST_REDELIVERY,
        "VLMQ_FAULTS": json.dumps({"crash_on_message": "kills-consumer"}),
        "VLMQ_MAX_CRASHES": "2",
    }
    stack.start_worker(env=env)
    client = stack.client()
    poison = client.submit(Job(media=[uris[0]], max_new_tokens=4, metadata={"tag": "kills-consumer"}), priority="bulk")
    ids = [poison.id] + [client.submit(Job(media=[u], max_new_tokens=4), priority="bulk").id for u in uris]

    restarts = supervise(stack, ids, env=env, timeout_s=240)

    results = {i: client.result(i, timeout=10) for i in ids}
    dead = results[poison.id]
    print(
        f"\nconsumer crash: {len(ids)} jobs, {restarts} worker deaths, dead-lettered after {dead.attempts} deliveries"
    )
    assert restarts == 2
    assert (dead.status, dead.error and dead.error.code, dead.attempts) == ("failed", "worker_lost", 3)
    assert "receiving this message, before its job could start" in (dead.error.message if dead.error else "")
    assert [results[i].status for i in ids[1:]] == ["succeeded"] * 4
    assert [(d.result.id, d.job["metadata"]) for d in client.dead_letters()] == [(poison.id, {"tag": "kills-consumer"})]


def livez(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_wedged_consumer_fails_liveness_within_its_setting(stack: Stack) -> None:
    uris = upload_images(stack, "wedge", 2)
    port = free_port()
    env = {"VLMQ_FAULTS": json.dumps({"wedge_on_message": "wedges-consumer"}), "VLMQ_LIVENESS_STALL_S": "3"}
    stack.start_worker("--metrics-port", str(port), env=env)
    client = stack.client()
    assert client.run([Job(media=[uris[0]], max_new_tokens=4)], progress=False, timeout=60)[0].ok
    assert livez(port)[0] == 200

    client.submit(Job(media=[uris[0]], max_new_tokens=4, metadata={"tag": "wedges-consumer"}), priority="bulk")
    client.submit(Job(media=[uris[1]], max_new_tokens=4), priority="bulk")
    wedged_at = time.monotonic()
    deadline = wedged_at + 60
    while (status := livez(port))[0] == 200:
        assert time.monotonic() < deadline, "/livez still 200 a minute after the consumer wedged"
        time.sleep(0.5)
    print(f"\nwedged consumer: /livez 503 after {time.monotonic() - wedged_at:.1f} s (stall setting 3 s)")
    assert status[0] == 503
    assert "the consumer has been reading one message for" in status[1]
    assert "VLMQ_LIVENESS_STALL_S=3: it is stuck" in status[1]
    assert sum(redis.Redis.from_url(stack.redis.url).llen(q) for q in queue_lists(stack.queue)) == 1


def test_a_foreign_job_without_submitted_at_still_expires_and_keeps_its_ttl_across_a_retry(stack: Stack) -> None:
    """Jobs from another client (no `submitted_at`) whose first fetch fails retryably (HTTP 503): the retry comes
    after a ttl_s of 0.5 s, counted from when a worker first saw the job, so that one ends `expired`; the same job
    with a TTL of 60 s runs on its retry."""
    png = encode(random_image(40, 30, seed=7), "PNG")
    with serve(ALLOWED_HOST, {}) as server:
        server.routes = routes = FirstBusy({"/a.png": (200, {}, png), "/b.png": (200, {}, png)})
        routes.asked = set()
        base = f"http://{ALLOWED_HOST}:{server.server_address[1]}"
        env = {
            "VLMQ_RETRY_BACKOFF_S": "2",
            "VLMQ_ALLOW_HTTP_MEDIA": "true",
            "VLMQ_ALLOW_PLAIN_HTTP": "true",
            "VLMQ_HTTP_ALLOWED_NETWORKS": json.dumps([f"{ALLOWED_HOST}/32"]),
        }
        stack.start_worker(env=env)
        client = stack.client()
        short, long = str(uuid.uuid4()), str(uuid.uuid4())
        for task_id, path, ttl in ((short, "/a.png", 0.5), (long, "/b.png", 60)):
            job = {"task": "caption", "media": [base + path], "max_new_tokens": 4, "ttl_s": ttl}
            publish(stack, stack.queue, celery_call(job), {"task": "vlmq.run", "id": task_id})
        expired, ran = client.result(short, timeout=60), client.result(long, timeout=60)
    assert (expired.status, expired.error and expired.error.code, expired.attempts) == ("failed", "expired", 2)
    assert (ran.status, ran.attempts) == ("succeeded", 2)
    assert ran.timings.queued is not None and ran.timings.queued >= 1000  # from first seen, across the ≥1 s retry
