"""Probes and queue metrics: readiness only once the model is loaded, liveness fails when the model loop is wedged,
and the exporter reports the backlog autoscaling reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import redis

from producer import Job
from producer.core.broker import queue_stats
from tests.conftest import Stack
from tests.helpers import LONG_QUESTION, OVER_TOKENS, scrape, upload_images
from worker.devtools.local_services import free_port, wait_until


def probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


def test_ready_only_after_the_model_loads_and_not_alive_while_a_batch_is_wedged(stack: Stack) -> None:
    uris = upload_images(stack, "health", 1)
    port = free_port()
    faults = {"load_delay_s": 3, "hang_over_tokens": OVER_TOKENS}
    env = {"VLMQ_FAULTS": json.dumps(faults), "VLMQ_LIVENESS_STALL_S": "2", "VLMQ_METRICS_PORT": str(port)}
    worker = stack.start_worker("--max-batch-size", "2", env=env, ready_count=0)
    wait_until(lambda: probe(port, "/readyz")[0] > 0, 60, "the worker's HTTP endpoint", worker.proc)

    assert probe(port, "/readyz") == (503, "loading the model")
    assert probe(port, "/livez") == (200, "loading the model")
    wait_until(lambda: probe(port, "/readyz")[0] == 200, 120, "readiness", worker.proc)
    assert probe(port, "/readyz") == (200, "ready")
    assert probe(port, "/livez") == (200, "alive")  # a real one-token forward pass
    health = subprocess.run([sys.executable, "-m", "producer.cli", "health", "--port", str(port)], check=False)
    assert health.returncode == 0

    client = stack.client()
    client.submit(Job(media=uris, max_new_tokens=4))
    assert client.result(client.submit(Job(media=uris, max_new_tokens=4)).id, timeout=60).ok
    client.submit(Job(task="qa", media=uris, question=LONG_QUESTION, max_new_tokens=4))  # wedges the model loop
    wait_until(lambda: probe(port, "/livez")[0] == 503, 60, "liveness to fail", worker.proc)
    status, reason = probe(port, "/livez")
    assert status == 503 and reason.startswith("a batch has run for ") and "VLMQ_LIVENESS_STALL_S=2" in reason
    health = subprocess.run([sys.executable, "-m", "producer.cli", "health", "--port", str(port)], check=False)
    assert health.returncode == 1


def test_the_exporter_reports_queue_length_age_of_the_oldest_job_and_pending_jobs(stack: Stack) -> None:
    client = stack.client()
    ten_minutes_ago = datetime.now(UTC) - timedelta(minutes=10)
    for i in range(5):
        job = Job(media=["s3://m/x.png"], submitted_at=ten_minutes_ago + timedelta(seconds=i))
        client.submit(job, priority="bulk")
    stats = queue_stats(redis.Redis.from_url(stack.redis.url), stack.queue, now=ten_minutes_ago.timestamp() + 600)
    assert (stats.length, round(stats.oldest_seconds), stats.pending) == (5, 600, 5)

    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "exporter", "--port", str(port), "--queues", f"{stack.queue},idle"],
        env={**os.environ, **stack.env},
    )
    try:
        wait_until(lambda: bool(scrape(port)), 30, "the exporter", exporter)
        metrics = scrape(port)
    finally:
        exporter.terminate()
        exporter.wait()
    queue = (("queue", stack.queue),)
    assert metrics[("vlmq_queue_length", queue)] == 5
    assert metrics[("vlmq_jobs_pending", queue)] == 5
    assert 600 <= metrics[("vlmq_queue_oldest_seconds", queue)] < 600 + time.time() - ten_minutes_ago.timestamp()
    assert metrics[("vlmq_queue_length", (("queue", "idle"),))] == 0
