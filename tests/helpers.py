"""Helpers shared by the integration tests: media uploads, result and log counting, a worker supervisor, a metrics
scraper, a local http media server, and the device-fault tests' token figures."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MEDIA_BUCKET, Stack
from tests.reference import encode, make_clip, random_image

# A dead worker's jobs come back after 5 s (the timeout must stay above the longest retry delay).
# A message lost by kombu (a worker killed between popping it and recording it) is sent again after 2-4 s.
FAST_REDELIVERY = {"VLMQ_VISIBILITY_TIMEOUT_S": "5", "VLMQ_RETRY_BACKOFF_MAX_S": "2", "VLMQ_RECOVER_INTERVAL_S": "2"}


def upload_images(stack: Stack, prefix: str, count: int) -> list[str]:
    s3 = stack.s3.client()
    uris = []
    for i in range(count):
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"{prefix}/{i}.png", Body=encode(random_image(40, 30, seed=i), "PNG"))
        uris.append(f"s3://{MEDIA_BUCKET}/{prefix}/{i}.png")
    return uris


def hanging_video(stack: Stack) -> tuple[str, list[str], dict[str, str]]:
    """A clip whose decoding hangs (VLMQ_FAULTS decode_hang_on), 2 images, and the worker environment for them."""
    stack.s3.client().put_object(
        Bucket=MEDIA_BUCKET, Key="hang/hang.mp4", Body=make_clip(frames=8, width=32, height=32, fps=8, seed=1)
    )
    env = {"VLMQ_MAX_DECODE_S": "2", "VLMQ_FAULTS": json.dumps({"decode_hang_on": "hang.mp4"})}
    return f"s3://{MEDIA_BUCKET}/hang/hang.mp4", upload_images(stack, "hang", 2), env


def results_ready(stack: Stack, job_ids: list[str]) -> int:
    """How many of the jobs have a terminal result in Celery's result backend."""
    client = redis.Redis.from_url(stack.redis.url)
    metas = client.mget([f"celery-task-meta-{i}" for i in job_ids])
    return sum(1 for m in metas if m is not None and json.loads(m)["status"] == "SUCCESS")


def supervise(
    stack: Stack, job_ids: list[str], *args: str, env: dict[str, str], timeout_s: float, on_progress=None
) -> int:
    """Restart the worker whenever it dies (as systemd or Kubernetes would) until every job has a result.

    `on_progress(done)` may kill the worker. Returns how many times the worker was restarted.
    """
    restarts = 0
    deadline = time.monotonic() + timeout_s
    while (done := results_ready(stack, job_ids)) < len(job_ids):
        assert time.monotonic() < deadline, f"{done} of {len(job_ids)} jobs have a result after {timeout_s} s"
        if on_progress is not None:
            on_progress(done)
        if stack.workers[-1].proc.poll() is not None:
            stack.start_worker(*args, env=env)
            restarts += 1
        time.sleep(0.1)
    return restarts


# Worker log lines, each with the job id as its group, for `count_in_logs`.
RECEIVED = r"Task vlmq.run\[(\S+)\] received"  # Celery took a message (a retry is another)
SUCCEEDED = r"job (\S+) finished: succeeded"  # logged right after the result is written to S3
RETURNED_STORED = r"job (\S+) already ended succeeded"  # a copy returned the success an earlier one stored


def count_in_logs(stack: Stack, pattern: str) -> Counter[str]:
    """Matches of `pattern`'s group (a job id) in every worker's log."""
    found: Counter[str] = Counter()
    for worker in stack.workers:
        found.update(re.findall(pattern, worker.log_path.read_text(errors="replace")))
    return found


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# On Linux all of 127.0.0.0/8 is loopback: the media server listens on 127.0.0.2, which the worker may read from,
# and a "secret" server on 127.0.0.1, which it must never reach (it serves a valid image, so a leak would succeed).
ALLOWED_HOST = "127.0.0.2"
SECRET_HOST = "127.0.0.1"


class MediaServer(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, tuple[int, dict[str, str], bytes]]
    requests: list[str]


class Handler(BaseHTTPRequestHandler):
    """Answers each path from the server's routes (status, headers, body); 404 for any other path."""

    protocol_version = "HTTP/1.1"
    server: MediaServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        status, headers, body = self.server.routes.get(self.path, (404, {}, b"no such file"))
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serve(host: str, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> Iterator[MediaServer]:
    """An http server on `host` (a free port) in a thread, answering `routes`."""
    server = MediaServer((host, 0), Handler)
    server.routes, server.requests = routes, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# The tiny model's caption job on a 40x30 image is 66 input tokens; a question of 1,400 characters makes 760.
LONG_QUESTION = "What is this? " * 100
OVER_TOKENS = 400


def publish(
    stack: Stack, queue: str, body: bytes, headers: dict[str, Any], content_type: str = "application/json"
) -> None:
    """One message on `queue`, as any AMQP-style client would publish it: raw bytes, headers and a content type."""
    with Connection(stack.redis.url) as connection:
        connection.Producer().publish(
            body,
            exchange="",
            routing_key=queue,
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8",
        )


def push_envelope(stack: Stack, queue: str, envelope: dict[str, Any]) -> None:
    """A message written into kombu's Redis list by hand, as a client that speaks the Redis layout would."""
    redis.Redis.from_url(stack.redis.url).lpush(queue, json.dumps(envelope))


def celery_call(job: dict[str, Any], kwargs: Any = None, embed: Any = None) -> bytes:
    return json.dumps([[job], {} if kwargs is None else kwargs, {} if embed is None else embed]).encode()


class FirstBusy(dict):  # type: ignore[type-arg]
    """Routes whose first request for each path answers 503 (a busy media server), and the file after."""

    asked: set[str]

    def get(self, path: str, default: Any = None) -> Any:
        first = path not in self.asked
        self.asked.add(path)
        return (503, {}, b"busy") if first else super().get(path, default)
