"""vlmq's native HTTP routes with plain HTTP (httpx), against a real `vlmq api`, Redis, SeaweedFS and a worker on the
tiny model: submit and long-poll, the same id twice is one job, cancel, upload then submit, a batch from an uploaded
manifest."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from PIL import Image

from producer.core.broker import queue_lists
from producer.core.jobs import DEFAULT_CAPTION_PROMPT
from tests.apiserver import Api, module_stack, start_api
from tests.conftest import MEDIA_BUCKET, Stack
from tests.helpers import count_in_logs
from tests.reference import encode, random_image, reference_text

__all__ = ["module_stack"]

TOKENS = 5


@pytest.fixture(scope="module")
def api(module_stack: Stack) -> Iterator[Api]:
    server = start_api(module_stack)  # no worker yet: the first tests need jobs to stay queued
    yield server
    server.stop()


@pytest.fixture
def http(api: Api) -> Iterator[httpx.Client]:
    with api.client() as client:
        yield client


def put_image(stack: Stack, key: str, seed: int) -> tuple[str, bytes]:
    body = encode(random_image(40, 30, seed=seed), "PNG")
    stack.s3.client().put_object(Bucket=MEDIA_BUCKET, Key=key, Body=body)
    return f"s3://{MEDIA_BUCKET}/{key}", body


def caption(stack: Stack, body: bytes) -> str:
    return reference_text(stack.model, [Image.open(io.BytesIO(body)).convert("RGB")], DEFAULT_CAPTION_PROMPT, TOKENS)


def queued(stack: Stack) -> int:
    client = redis.Redis.from_url(stack.redis.url)
    return sum(client.llen(name) for name in queue_lists(f"{stack.queue}-interactive"))


def test_the_same_id_twice_is_one_job_and_a_queued_job_can_be_cancelled(
    module_stack: Stack, http: httpx.Client
) -> None:
    uri, _ = put_image(module_stack, "native/once.png", 1)
    first = http.post("/jobs", json={"id": "once-1", "media": [uri], "max_new_tokens": TOKENS})
    again = http.post("/jobs", json={"id": "once-1", "media": [uri], "max_new_tokens": TOKENS})
    assert (first.status_code, first.json()) == (
        202,
        {"id": "once-1", "status": "queued", "status_url": "/jobs/once-1", "duplicate": False},
    )
    assert (again.status_code, again.json()) == (
        200,
        {"id": "once-1", "status": "queued", "status_url": "/jobs/once-1", "duplicate": True},
    )
    assert queued(module_stack) == 1
    assert http.get("/jobs/once-1").json() == {"id": "once-1", "status": "queued", "result": None}

    cancelled = http.post("/jobs/once-1/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "failed"
    assert cancelled.json()["result"]["error"] == {
        "code": "cancelled",
        "message": "the job was cancelled before it started",
        "retryable": False,
    }
    assert queued(module_stack) == 0
    assert http.get("/jobs/once-1").json()["result"]["error"]["code"] == "cancelled"


def test_twenty_concurrent_requests_with_one_new_id_send_it_once(module_stack: Stack, api: Api) -> None:
    uri, _ = put_image(module_stack, "native/race.png", 4)
    job = {"id": "race-1", "media": [uri], "max_new_tokens": TOKENS}

    def post(_: int) -> tuple[int, bool]:
        with api.client() as client:
            answer = client.post("/jobs", json=job)
        return answer.status_code, answer.json()["duplicate"]

    with ThreadPoolExecutor(20) as pool:
        answers = sorted(pool.map(post, range(20)))
    assert answers == [(200, True)] * 19 + [(202, False)]
    assert queued(module_stack) == 1
    assert http_cancel(api, "race-1") == 200


def http_cancel(api: Api, job_id: str) -> int:
    with api.client() as client:
        return client.post(f"/jobs/{job_id}/cancel").status_code


def test_a_job_long_polls_to_its_result_and_a_finished_job_cannot_be_cancelled(
    module_stack: Stack, http: httpx.Client
) -> None:
    module_stack.start_worker()
    uri, body = put_image(module_stack, "native/poll.png", 2)
    accepted = http.post("/jobs", json={"id": "poll-1", "media": [uri], "max_new_tokens": TOKENS})
    assert accepted.status_code == 202
    answer = http.get("/jobs/poll-1", params={"wait": 60}).json()
    assert answer["status"] == "succeeded"
    assert answer["result"]["text"] == caption(module_stack, body)
    assert answer["result"]["attempts"] == 1

    again = http.post("/jobs", json={"id": "poll-1", "media": [uri], "max_new_tokens": TOKENS})
    assert (again.status_code, again.json()["status"], again.json()["duplicate"]) == (200, "succeeded", True)
    refused = http.post("/jobs/poll-1/cancel")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "not_cancellable"
    assert count_in_logs(module_stack, r"job (poll-1) finished")["poll-1"] == 1
    # the cancelled job of the first test never ran, though a worker now consumes its queue
    assert count_in_logs(module_stack, r"(once-1)")["once-1"] == 0


def test_an_unknown_job_is_404_and_wait_is_capped(http: httpx.Client) -> None:
    started = time.monotonic()
    answer = http.get("/jobs/no-such-job", params={"wait": 5})
    assert time.monotonic() - started < 4  # unknown: nothing to wait for
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


def test_an_uploaded_image_is_staged_sniffed_and_captioned(module_stack: Stack, http: httpx.Client) -> None:
    body = encode(random_image(40, 30, seed=3), "PNG")
    uploaded = http.post("/media", content=body, headers={"Content-Type": "application/octet-stream"})
    assert uploaded.status_code == 201
    staged = uploaded.json()
    assert (staged["kind"], staged["content_type"], staged["bytes"]) == ("image", "image/png", len(body))
    assert staged["uri"].startswith("s3://") and staged["uri"].endswith(".png")
    job = http.post("/jobs", json={"media": [staged["uri"]], "max_new_tokens": TOKENS}).json()
    result = http.get(job["status_url"], params={"wait": 60}).json()["result"]
    assert result["text"] == caption(module_stack, body)

    refused = http.post("/media", content=b"just text, not an image")
    assert refused.status_code == 415
    assert refused.json()["error"]["code"] == "media_unsupported"


def test_a_batch_from_an_uploaded_manifest_runs_and_streams_results_and_errors(
    module_stack: Stack, http: httpx.Client
) -> None:
    uris = [put_image(module_stack, f"native/batch-{i}.png", 10 + i)[0] for i in range(4)]
    uris.insert(2, f"s3://{MEDIA_BUCKET}/native/missing.png")
    manifest = "".join(json.dumps({"custom_id": f"m-{i}", "media": [u]}) + "\n" for i, u in enumerate(uris))
    uploaded = http.post("/manifests", content=manifest.encode())
    assert uploaded.status_code == 201
    name = f"shoes-{module_stack.queue}"
    started = http.post(
        "/batches", json={"name": name, "manifest": uploaded.json()["uri"], "defaults": {"max_new_tokens": TOKENS}}
    )
    assert started.status_code == 202
    deadline = time.monotonic() + 120
    while (status := http.get(f"/batches/{name}").json())["status"] in ("submitting", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert {k: status[k] for k in ("status", "total", "succeeded", "failed", "cancelled", "eta_s")} == {
        "status": "completed_with_failures",
        "total": 5,
        "succeeded": 4,
        "failed": 1,
        "cancelled": 0,
        "eta_s": 0.0,
    }
    results = [json.loads(line) for line in http.get(f"/batches/{name}/results").text.splitlines()]
    errors = [json.loads(line) for line in http.get(f"/batches/{name}/errors").text.splitlines()]
    assert [r["id"] for r in results] == ["m-0", "m-1", "m-3", "m-4"]
    assert [(e["id"], e["error"]["code"]) for e in errors] == [("m-2", "media_not_found")]
    assert http.get("/batches/no-such-batch").status_code == 404

    put_image(module_stack, "native/missing.png", 99)  # the missing object appears: its job can succeed now
    assert http.post(f"/batches/{name}/retry-failed").json() == {"retried": ["m-2"]}
    deadline = time.monotonic() + 120
    while (status := http.get(f"/batches/{name}").json())["status"] in ("submitting", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert (status["status"], status["succeeded"], status["failed"]) == ("completed", 5, 0)
    results = [json.loads(line) for line in http.get(f"/batches/{name}/results").text.splitlines()]
    assert [r["id"] for r in results] == ["m-0", "m-1", "m-2", "m-3", "m-4"]
    assert http.get(f"/batches/{name}/errors").text == ""


def test_a_batch_from_an_s3_prefix_takes_its_images_and_defaults(module_stack: Stack, http: httpx.Client) -> None:
    bodies = [put_image(module_stack, f"native/prefix/{i}.png", 20 + i)[1] for i in range(2)]
    module_stack.s3.client().put_object(Bucket=MEDIA_BUCKET, Key="native/prefix/notes.txt", Body=b"not media")
    name = f"prefix-{module_stack.queue}"
    body = {"name": name, "prefix": f"s3://{MEDIA_BUCKET}/native/prefix/", "defaults": {"max_new_tokens": TOKENS}}
    assert http.post("/batches", json=body).status_code == 202
    deadline = time.monotonic() + 120
    while (status := http.get(f"/batches/{name}").json())["status"] in ("submitting", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert (status["status"], status["total"], status["succeeded"]) == ("completed", 2, 2)
    results = [json.loads(line) for line in http.get(f"/batches/{name}/results").text.splitlines()]
    assert [r["text"] for r in results] == [caption(module_stack, b) for b in bodies]
    both = http.post("/batches", json={**body, "manifest": "s3://x/y.jsonl"})
    assert (both.status_code, both.json()["error"]["code"]) == (422, "invalid_request")
