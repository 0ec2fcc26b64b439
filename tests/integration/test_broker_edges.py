"""Edges of Celery's and kombu's Redis delivery, with real redis-server, SeaweedFS and worker processes: an `eta`
further ahead than the visibility timeout is refused at once rather than delivered again while it waits; a Celery
retry keeps the message's `expires`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.apiserver import module_stack
from tests.conftest import Stack
from tests.helpers import (
    ALLOWED_HOST,
    FirstBusy,
    MediaServer,
    celery_call,
    publish,
    serve,
    upload_images,
)
from tests.reference import encode, random_image

__all__ = ["module_stack"]

VISIBILITY_TIMEOUT_S = 20


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
