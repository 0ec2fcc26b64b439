"""`vlmq api`'s gate and refusals, against real `vlmq api` processes (no worker: nothing here reaches one): keys,
body and media caps, malformed requests, the workers' media allow-list, rate limits, start-up without keys, and the
operations routes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.apiserver import KEY, OTHER_KEY, ROOT, Api, module_stack, start_api
from tests.conftest import Stack
from tests.helpers import scrape
from tests.reference import encode, random_image
from worker.devtools.local_services import free_port, wait_until

__all__ = ["module_stack"]

IN_FLIGHT = ("vlmq_api_requests_in_flight", ())
THIRD_KEY = "test-key-3"
MEDIA_CAP = 4000
FILE_CAP = 100_000


@pytest.fixture(scope="module")
def api(module_stack: Stack) -> Iterator[Api]:
    env = {
        "VLMQ_MAX_MEDIA_BYTES": str(MEDIA_CAP),
        "VLMQ_MAX_FILE_BYTES": str(FILE_CAP),
        "VLMQ_ALLOW_HTTP_MEDIA": "true",
    }
    server = start_api(module_stack, env=env)
    yield server
    server.stop()


def chat(url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def test_no_key_and_a_wrong_key_are_401(api: Api) -> None:
    with api.client(key=None) as anonymous, api.client(key="not-a-key") as wrong:
        missing, bad = anonymous.get("/v1/models"), wrong.get("/jobs/x")
    assert (missing.status_code, missing.json()["error"]) == (
        401,
        {
            "message": "no API key was sent; send `Authorization: Bearer <key>` with a key from VLMQ_API_KEYS",
            "type": "authentication_error",
            "param": None,
            "code": "unauthorized",
        },
    )
    assert (bad.status_code, bad.json()["error"]["code"]) == (401, "unauthorized")
    assert bad.json()["error"]["message"].startswith("the API key is not valid")
    with api.client(key=OTHER_KEY) as other:
        assert other.get("/v1/models").status_code == 200


def test_an_oversized_body_is_413(api: Api) -> None:
    with api.client() as http:
        answer = http.post(
            "/jobs", content=b"[" + b"0," * (1 << 20) + b"0]", headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == 413
    assert answer.json()["error"] == {
        "message": "the request body is larger than 1,048,576 bytes, the limit for this route",
        "type": "invalid_request_error",
        "param": None,
        "code": "body_too_large",
    }


def test_a_batch_input_file_over_its_cap_is_413(api: Api) -> None:
    with api.client() as http:
        answer = http.post("/v1/files", files={"file": ("big.jsonl", b"{}\n" * FILE_CAP)}, data={"purpose": "batch"})
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "body_too_large")
    assert answer.json()["error"]["message"] == (
        f"the request body is larger than {FILE_CAP + 65536:,} bytes, the limit for this route"
    )


def test_a_body_that_lies_about_its_length_is_cut_off_at_the_cap(api: Api) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to refuse early
        for _ in range(40):
            yield b" " * (64 << 10)

    with api.client() as http:
        answer = http.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "body_too_large")


def test_a_data_url_over_the_media_cap_is_413(api: Api) -> None:
    image = encode(random_image(60, 60, seed=1), "PNG")
    assert len(image) > MEDIA_CAP
    with api.client() as http:
        answer = http.post(
            "/v1/chat/completions", json=chat("data:image/png;base64," + base64.b64encode(image).decode())
        )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "media_too_large"
    assert answer.json()["error"]["param"] == "messages.0.content.0.image_url.url"


def test_an_upload_over_the_media_cap_is_413(api: Api) -> None:
    with api.client() as http:
        declared = http.post("/media", content=b"\x89PNG\r\n\x1a\n" + b"0" * MEDIA_CAP)

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
            yield b"\x89PNG\r\n\x1a\n"
            for _ in range(10):
                yield b"0" * 1000

        streamed = http.post("/media", content=chunks())
    for answer in (declared, streamed):
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "media_too_large"


def test_a_data_url_is_typed_by_its_bytes_not_its_label(api: Api) -> None:
    png = base64.b64encode(encode(random_image(8, 8, seed=2), "PNG")).decode()
    body = chat("s3://b/a.png")
    body["messages"][0]["content"][0] = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{png}"}}
    with api.client() as http:
        as_video = http.post("/v1/chat/completions", json=body)
        text = http.post("/v1/chat/completions", json=chat("data:image/png;base64," + base64.b64encode(b"hi").decode()))
    assert (as_video.status_code, as_video.json()["error"]["code"]) == (400, "media_unsupported")
    assert as_video.json()["error"]["message"] == "the data: URL holds an image, not a video"
    assert (text.status_code, text.json()["error"]["code"]) == (415, "media_unsupported")


def test_malformed_json_is_422_naming_the_field(api: Api) -> None:
    with api.client() as http:
        wrong_type = http.post("/jobs", json={"media": ["s3://b/a.png"], "max_new_tokens": "many"})
        unknown = http.post("/v1/chat/completions", json={**chat("s3://b/a.png"), "tools": []})
        not_json = http.post("/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert wrong_type.status_code == 422
    assert wrong_type.json()["error"] == {
        "message": "generation.max_new_tokens: Input should be a valid integer, unable to parse string as an integer",
        "type": "invalid_request_error",
        "param": "generation.max_new_tokens",
        "code": "invalid_job",
    }
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (422, "tools")
    assert not_json.status_code == 422
    assert not_json.json()["error"]["message"].startswith("the body is not valid JSON at character 1")


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1/cat.png", "https://10.1.2.3/cat.png", "https://169.254.169.254/x.jpg"]
)
def test_a_private_network_https_url_is_refused_with_the_workers_code(api: Api, url: str) -> None:
    with api.client() as http:
        native = http.post("/jobs", json={"media": [url]})
        openai_route = http.post("/v1/chat/completions", json=chat(url))
    address = url.split("/")[2]
    for answer, param in ((native, "media.0"), (openai_route, "messages.0.content.0.image_url.url")):
        assert answer.status_code == 400
        assert answer.json()["error"] == {
            "message": f"{url} resolves to {address}, which is not a public address; add its network to "
            "VLMQ_HTTP_ALLOWED_NETWORKS if the workers may read from it",
            "type": "invalid_request_error",
            "param": param,
            "code": "media_forbidden",
        }


def test_a_key_over_its_rate_is_429_with_retry_after_and_other_keys_are_not(module_stack: Stack) -> None:
    env = {
        "VLMQ_RATE_LIMIT_PER_S": "0.2",
        "VLMQ_RATE_BURST": "3",
        "VLMQ_MAX_CONCURRENT_PER_KEY": "2",
        "VLMQ_API_KEYS": f"{KEY},{OTHER_KEY},{THIRD_KEY}",
    }
    limited = start_api(module_stack, env=env, name="api-rate")
    try:
        with limited.client() as http, limited.client(key=OTHER_KEY) as other:
            codes = [http.get("/v1/models").status_code for _ in range(4)]
            refused = http.get("/v1/models")
            assert other.get("/v1/models").status_code == 200
            busy = two_long_polls_and_one_more(limited)
    finally:
        limited.stop()
    assert codes == [200, 200, 200, 429]
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "5"
    assert refused.json()["error"]["code"] == "rate_limited"
    assert (busy.status_code, busy.headers["Retry-After"], busy.json()["error"]["code"]) == (429, "1", "rate_limited")
    assert (
        busy.json()["error"]["message"]
        == "this key has 2 requests in flight, the most it may (across every API process); wait for one to finish"
    )


def two_long_polls_and_one_more(api: Api) -> httpx.Response:
    """With two of a key's requests waiting on a queued job (no worker runs it), the key's third request."""
    with api.client(key=THIRD_KEY) as http:
        assert http.post("/jobs", json={"id": "waited-on", "media": ["s3://b/a.png"]}).status_code == 202

        def poll() -> int:
            with api.client(key=THIRD_KEY) as client:
                return client.get("/jobs/waited-on", params={"wait": 3}).status_code

        with ThreadPoolExecutor(2) as pool:
            polls = [pool.submit(poll) for _ in range(2)]
            wait_until(lambda: scrape(api.port)[IN_FLIGHT] == 2, 10, "two long polls in flight")
            third = http.get("/jobs/waited-on")
            assert [p.result() for p in polls] == [200, 200]
    return third


def test_without_keys_it_refuses_to_start_unless_told_to_serve_locally(module_stack: Stack) -> None:
    env = {**os.environ, **module_stack.env, "VLMQ_API_KEYS": "", "PYTHONPATH": str(ROOT)}
    refused = subprocess.run(
        [sys.executable, "-m", "producer.cli", "api", "--port", "1"], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "vlmq api: cannot start: VLMQ_API_KEYS is empty" in refused.stderr
    local = start_api(module_stack, "--allow-no-auth-local", env={"VLMQ_API_KEYS": ""}, name="api-local")
    try:
        with httpx.Client(base_url=local.url) as http:
            assert http.get("/v1/models").status_code == 200
        assert "vlmq api on http://127.0.0.1:" in local.service.log_path.read_text()
    finally:
        local.stop()


def test_an_openai_batch_cancelled_before_any_worker_runs_is_cancelling(api: Api) -> None:
    lines = "".join(
        json.dumps(
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat("s3://b/a.png")}
        )
        + "\n"
        for i in range(3)
    )
    with api.client() as http:
        upload = http.post("/v1/files", files={"file": ("in.jsonl", lines.encode())}, data={"purpose": "batch"})
        assert (upload.status_code, upload.json()["bytes"], upload.json()["purpose"]) == (200, len(lines), "batch")
        body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        created = http.post("/v1/batches", json=body).json()
        cancelled = http.post(f"/v1/batches/{created['id']}/cancel").json()
        deadline = time.monotonic() + 30
        while (later := http.get(f"/v1/batches/{created['id']}").json())["request_counts"]["total"] == 0:
            assert time.monotonic() < deadline, later  # still validating its lines
            time.sleep(0.1)
        wrong_endpoint = http.post("/v1/batches", json={**body, "endpoint": "/v1/embeddings"})
        no_file = http.post("/v1/batches", json={**body, "input_file_id": "file-nothere"})
        missing = http.get("/v1/files/file-nothere")
    assert (created["status"], created["cancelling_at"]) == ("validating", None)
    assert cancelled["status"] == "cancelling"  # cancelled while validating: applied once its jobs are sent
    assert created["created_at"] <= cancelled["cancelling_at"] <= created["created_at"] + 60
    assert later["status"] == "cancelling"  # until workers end its queued requests `cancelled`
    assert later["cancelling_at"] == cancelled["cancelling_at"]
    assert later["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert (wrong_endpoint.status_code, wrong_endpoint.json()["error"]["param"]) == (400, "endpoint")
    assert (no_file.status_code, no_file.json()["error"]["code"]) == (404, "not_found")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")


def test_an_openai_batch_over_50000_lines_fails_with_its_reason(api: Api) -> None:
    with api.client() as http:
        upload = http.post("/v1/files", files={"file": ("in.jsonl", b"\n" * 50_001)}, data={"purpose": "batch"})
        body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        created = http.post("/v1/batches", json=body).json()
        deadline = time.monotonic() + 30
        while (batch := http.get(f"/v1/batches/{created['id']}").json())["status"] == "validating":
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)
    assert batch["status"] == "failed"
    assert batch["errors"] == {
        "object": "list",
        "data": [{"code": "invalid_request", "message": "more than 50,000 requests", "param": "input_file_id"}],
    }


def test_without_redis_it_is_alive_not_ready_and_answers_503(module_stack: Stack) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    api = start_api(module_stack, env={"VLMQ_BROKER_URL": dead}, name="api-no-redis")
    try:
        with api.client() as http:
            alive, ready = http.get("/healthz"), http.get("/readyz")
            submitted = http.post("/jobs", json={"media": ["s3://b/a.png"]})
    finally:
        api.stop()
    assert alive.status_code == 200
    assert (ready.status_code, ready.json()["status"], sorted(ready.json()["problems"])) == (
        503,
        "unavailable",
        ["redis"],
    )
    assert (submitted.status_code, submitted.json()["error"]["code"]) == (503, "unavailable")
    assert submitted.headers["Retry-After"] == "1"


def test_twenty_long_polls_share_one_read_of_redis_per_interval(module_stack: Stack, api: Api) -> None:
    ids = [f"polled-{i}" for i in range(20)]
    with api.client() as http:
        for job_id in ids:
            assert http.post("/jobs", json={"id": job_id, "media": ["s3://b/a.png"]}).status_code == 202
    stats = redis.Redis.from_url(module_stack.redis.url)
    before = stats.info("commandstats")

    def poll(job_id: str) -> str:
        with api.client() as client:
            return str(client.get(f"/jobs/{job_id}", params={"wait": 2}).json()["status"])

    with ThreadPoolExecutor(20) as pool:
        states = list(pool.map(poll, ids))
    after = stats.info("commandstats")
    calls = {
        c: after[f"cmdstat_{c}"]["calls"] - before.get(f"cmdstat_{c}", {"calls": 0})["calls"] for c in ("get", "mget")
    }
    assert states == ["queued"] * 20
    # each request reads the job's state as it starts and as it times out (its result, and its start count: 2 GETs
    # each time); polling each job alone every 50 ms would add some 800 more
    assert calls["get"] == 4 * 20, calls
    assert 20 <= calls["mget"] <= 60, calls  # 2 s / 50 ms, for all twenty together


def test_openapi_health_readiness_and_metrics(api: Api) -> None:
    healthz = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
    refused = (("method", "GET"), ("route", "unmatched"), ("status", "401"))  # refused before routing
    seen = scrape(api.port)
    before = {labels: seen.get(("vlmq_api_requests_total", labels), 0) for labels in (healthz, refused)}
    with api.client(key=None) as http:
        assert http.get("/v1/models").status_code == 401
        spec = http.get("/openapi.json").json()
        assert http.get("/docs").status_code == 200
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready"}
    assert spec["openapi"].startswith("3.1")
    assert {"Job", "JobResult", "JobError", "Media", "Generation", "Usage"} <= set(spec["components"]["schemas"])
    assert spec["paths"]["/jobs"]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Job"
    }
    assert {"/v1/chat/completions", "/v1/files", "/v1/batches", "/jobs/{job_id}", "/batches/{name}"} <= set(
        spec["paths"]
    )
    samples = scrape(api.port)
    assert samples[("vlmq_api_requests_total", healthz)] == before[healthz] + 1
    assert samples[("vlmq_api_request_seconds_count", healthz[:2])] == before[healthz] + 1
    assert samples[("vlmq_api_requests_total", refused)] == before[refused] + 1
    assert KEY not in httpx.get(f"{api.url}/metrics").text
