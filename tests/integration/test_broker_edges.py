"""Edges of Celery's and kombu's Redis delivery, with real redis-server, SeaweedFS and worker processes: a message in
gocelery's envelope held by a worker that is killed comes back to its queue (kombu's restore followed the envelope's
own route, to `ae.undeliver`); an `eta` further ahead than the visibility timeout is refused at once rather than
delivered again while it waits; a Celery retry keeps the message's `expires`.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from producer import Job
from tests.apiserver import module_stack
from tests.conftest import Stack
from tests.helpers import (
    ALLOWED_HOST,
    FAST_REDELIVERY,
    RECEIVED,
    SUCCEEDED,
    FirstBusy,
    MediaServer,
    celery_call,
    count_in_logs,
    publish,
    serve,
    upload_images,
)
from tests.reference import encode, random_image
from worker.consumer import HELD, VlmqChannel
from worker.devtools.local_services import RedisServer
from worker.visibility import UNACKED_INDEX, VisibilityHeartbeat, beat_every_s

__all__ = ["module_stack"]

VISIBILITY_TIMEOUT_S = 20
KILLS_ITS_WORKER = "held-when-killed"


def gocelery_envelope(task_id: str, job: dict[str, Any]) -> dict[str, Any]:
    """A task as gocelery writes it into kombu's Redis list: protocol 1 in the body, no headers, and the route
    exchange `celery` / routing key `celery` whatever list it is pushed to."""
    body = {"id": task_id, "task": "vlmq.run", "args": [job], "kwargs": {}, "retries": 0, "eta": None, "expires": None}
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-type": "application/json",
        "properties": {
            "body_encoding": "base64",
            "correlation_id": task_id,
            "reply_to": str(uuid.uuid4()),
            "delivery_info": {"priority": 0, "routing_key": "celery", "exchange": "celery"},
            "delivery_mode": 2,
            "delivery_tag": str(uuid.uuid4()),
        },
        "content-encoding": "utf-8",
    }


def body_id(raw: bytes) -> str | None:
    """The task id in a protocol 1 envelope's body, as stored in a list or in kombu's unacknowledged hash; None for
    another protocol's envelope (the session's Redis also holds other tests' messages: protocol 2 bodies are lists)."""
    try:
        envelope = json.loads(raw)
        envelope = envelope[0] if isinstance(envelope, list) else envelope  # the hash: [envelope, exchange, key]
        body = json.loads(base64.b64decode(envelope["body"]))
    except (ValueError, KeyError, TypeError, IndexError):  # another test's malformed message
        return None
    return str(body["id"]) if isinstance(body, dict) and "id" in body else None


def held(client: redis.Redis, task_id: str) -> list[Any]:
    """kombu's unacknowledged entries ([envelope, exchange, routing key]) of the task."""
    return [json.loads(raw) for raw in client.hvals("unacked") if body_id(raw) == task_id]  # type: ignore[union-attr]


def test_a_gocelery_message_held_by_a_killed_worker_is_restored_to_its_queue_and_runs(stack: Stack) -> None:
    [uri] = upload_images(stack, KILLS_ITS_WORKER, 1)
    task_id = str(uuid.uuid4())
    client = redis.Redis.from_url(stack.redis.url)
    client.lpush(stack.queue, json.dumps(gocelery_envelope(task_id, {"media": [uri], "max_new_tokens": 4})))
    doomed = stack.start_worker(env={**FAST_REDELIVERY, "VLMQ_FAULTS": json.dumps({"crash_on": KILLS_ITS_WORKER})})
    doomed.proc.wait(timeout=120)  # SIGKILLed when the job started: the message is held, unacknowledged

    [[envelope, exchange, routing_key]] = held(client, task_id)
    assert (exchange, routing_key, envelope["headers"]) == ("", stack.queue, {})  # the route back to its own list
    stack.start_worker(env=FAST_REDELIVERY)  # restores it after the visibility timeout, then runs it
    result = stack.client().result(task_id, timeout=120)

    assert (doomed.proc.returncode, result.status, result.attempts) == (-9, "succeeded", 2)
    assert task_id not in [body_id(raw) for raw in client.lrange("ae.undeliver", 0, -1)]  # type: ignore[union-attr]


def test_messages_a_busy_worker_holds_past_the_visibility_timeout_are_not_delivered_again(stack: Stack) -> None:
    """Two live workers, each holding 4 messages and running one job at a time for 2 s: most messages wait in their
    worker longer than the 3 s visibility timeout, while both workers sweep for stale ones every second. The
    visibility heartbeat keeps them held, so each is received once and runs once (celery#5935)."""
    uris = upload_images(stack, "held", 8)
    env = {**FAST_REDELIVERY, "VLMQ_VISIBILITY_TIMEOUT_S": "3", "VLMQ_FAULTS": json.dumps({"slow_batch_s": 2})}
    args = ("--max-batch-size", "1", "--concurrency", "4", "--preprocess-workers", "1", "--max-wait-ms", "0")
    stack.start_worker(*args, env=env)
    stack.start_worker(*args, env=env)
    client = stack.client()
    ids = [client.submit(Job(media=[uri], max_new_tokens=2)).id for uri in uris]
    results = client.collect(ids, progress=False, timeout=120)

    assert [(r.status, r.attempts) for r in results] == [("succeeded", 1)] * 8
    assert count_in_logs(stack, RECEIVED) == Counter(dict.fromkeys(ids, 1))
    assert count_in_logs(stack, SUCCEEDED) == Counter(dict.fromkeys(ids, 1))


class _Transport(kombu_redis.Transport):
    Channel = VlmqChannel  # as `worker.consumer.tolerate_foreign_envelopes` makes it in a worker process


@pytest.mark.parametrize("headers", ["absent", None, {}])
def test_kombus_restore_puts_a_hand_written_envelope_back_on_the_list_it_came_from(
    redis_server: RedisServer, headers: Any
) -> None:
    """kombu's own restore (the one a lost connection or a shutdown runs), on a real Redis: an envelope without
    headers, with null headers (kombu's restore raised on it and dropped the message) or with gocelery's route."""
    queue, task_id = f"q-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    envelope = gocelery_envelope(task_id, {"media": ["s3://b/a.png"]})
    if headers != "absent":
        envelope["headers"] = headers
    client = redis.Redis.from_url(redis_server.url)
    client.lpush(queue, json.dumps(envelope))
    received: list[Any] = []
    with Connection(redis_server.url, transport=_Transport) as connection:
        channel = connection.default_channel
        channel.basic_consume(queue, no_ack=False, callback=received.append, consumer_tag="test")
        connection.drain_events(timeout=10)
        assert len(held(client, task_id)) == 1
        channel.qos.restore_unacked()

    [back] = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]  # type: ignore[union-attr]
    assert [m.headers for m in received] == [{}]
    assert back["headers"] == {"redelivered": True}
    assert back["properties"]["delivery_info"] == {
        "priority": 0,
        "routing_key": queue,
        "exchange": "",
        "redelivered": True,
    }
    assert back["body"] == envelope["body"]


def test_the_heartbeat_rearms_the_messages_its_process_holds_and_nothing_else(redis_server: RedisServer) -> None:
    """On kombu's own channel and a real Redis: of two delivered messages, the acknowledged one leaves the index
    and is not put back; the held one gets the beat's time; another worker's entry keeps its own."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url)
    for _ in range(2):
        client.lpush(queue, json.dumps(gocelery_envelope(str(uuid.uuid4()), {"media": ["s3://b/a.png"]})))
    client.zadd(UNACKED_INDEX, {"another-workers-tag": 5.0})
    received: list[Any] = []
    with Connection(redis_server.url, transport=_Transport) as connection:
        channel = connection.default_channel
        channel.basic_consume(queue, no_ack=False, callback=received.append, consumer_tag="test")
        while len(received) < 2:
            connection.drain_events(timeout=10)
        acked, kept = received
        acked.ack()
        heartbeat = VisibilityHeartbeat(client, HELD.tags, clock=lambda: 1000.0)

        assert (HELD.tags(), heartbeat.beat()) == ([kept.delivery_tag], 1)
        assert client.zrange(UNACKED_INDEX, 0, -1, withscores=True) == [
            (b"another-workers-tag", 5.0),
            (kept.delivery_tag.encode(), 1000.0),
        ]


def test_a_beat_comes_every_quarter_of_the_visibility_timeout_and_at_most_every_30_s() -> None:
    assert [beat_every_s(t) for t in (1, 3, 20, 120, 900)] == [0.5, 0.75, 5.0, 30.0, 30.0]


@pytest.fixture(scope="module")
def media(module_stack: Stack) -> Iterator[MediaServer]:
    """An http media server whose first answer for each path is 503 (retried), and a worker reading from it."""
    png = encode(random_image(40, 30, seed=7), "PNG")
    with serve(ALLOWED_HOST, {}) as server:
        server.routes = routes = FirstBusy({"/a.png": (200, {}, png), "/b.png": (200, {}, png)})
        routes.asked = set()
        env = {
            "VLMQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
            "VLMQ_RETRY_BACKOFF_S": "6",  # the first retry comes 3-6 s later
            "VLMQ_RETRY_BACKOFF_MAX_S": "12",
            "VLMQ_ALLOW_HTTP_MEDIA": "true",
            "VLMQ_ALLOW_PLAIN_HTTP": "true",
            "VLMQ_HTTP_ALLOWED_NETWORKS": json.dumps([f"{ALLOWED_HOST}/32"]),
        }
        module_stack.start_worker(env=env)
        yield server


def test_a_retry_keeps_the_messages_celery_expires(module_stack: Stack, media: MediaServer) -> None:
    """Two jobs whose first fetch fails retryably (HTTP 503): the one whose Celery `expires` passes before its retry
    ends `expired` on the retry without fetching again; the one with a later `expires` runs on its retry."""
    base = f"http://{ALLOWED_HOST}:{media.server_address[1]}"
    now = datetime.now(UTC)
    short, long = str(uuid.uuid4()), str(uuid.uuid4())
    for task_id, path, expires_s in ((short, "/a.png", 2.5), (long, "/b.png", 120)):
        job = {"task": "caption", "media": [base + path], "max_new_tokens": 4}
        expires = (now + timedelta(seconds=expires_s)).isoformat()
        publish(
            module_stack, module_stack.queue, celery_call(job), {"task": "vlmq.run", "id": task_id, "expires": expires}
        )
    client = module_stack.client()
    expired, ran = client.result(short, timeout=60), client.result(long, timeout=60)

    assert (expired.status, expired.error and expired.error.code, expired.attempts) == ("failed", "expired", 2)
    assert (ran.status, ran.attempts) == ("succeeded", 2)
    assert sorted(media.requests) == ["/a.png", "/b.png", "/b.png"]  # the expired retry fetched nothing


def test_an_eta_beyond_the_visibility_timeout_is_refused_and_a_nearer_one_runs_once(
    module_stack: Stack, media: MediaServer
) -> None:
    [uri] = upload_images(module_stack, "eta", 1)
    job = {"task": "caption", "media": [uri], "max_new_tokens": 4}
    now = datetime.now(UTC)
    far, near = str(uuid.uuid4()), str(uuid.uuid4())
    near_eta = now + timedelta(seconds=3)
    for task_id, eta in ((far, now + timedelta(seconds=VISIBILITY_TIMEOUT_S + 40)), (near, near_eta)):
        publish(
            module_stack,
            module_stack.queue,
            celery_call(job),
            {"task": "vlmq.run", "id": task_id, "eta": eta.isoformat()},
        )
    client = module_stack.client()
    refused, ran = client.result(far, timeout=30), client.result(near, timeout=30)

    assert (refused.status, refused.error and refused.error.code, refused.attempts) == ("failed", "invalid_job", 1)
    assert "s ahead, more than the broker's visibility timeout (VLMQ_VISIBILITY_TIMEOUT_S=20)" in (
        refused.error.message if refused.error else ""
    )
    assert (ran.status, ran.attempts) == ("succeeded", 1)
    assert ran.finished_at >= near_eta
