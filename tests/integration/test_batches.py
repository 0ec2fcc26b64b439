"""Named batches end to end: an S3 prefix in, counts and JSONL results out, resume, retry-failed, cancel,
webhook, manifest validation. Real Redis, SeaweedFS and worker processes."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import redis

from producer import Job
from producer.core.webhook import signature
from producer.manifest import read_manifest
from tests.conftest import MEDIA_BUCKET, Stack
from tests.helpers import SUCCEEDED, count_in_logs
from tests.reference import encode, random_image
from worker.devtools.local_services import free_port, wait_until

SECRET = "webhook-secret"


def upload_prefix(stack: Stack, prefix: str, count: int, corrupt: set[int]) -> None:
    s3 = stack.s3.client()
    for i in range(count):
        body = encode(random_image(40, 30, seed=i), "PNG")
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"{prefix}/{i:03d}.png", Body=body[:60] if i in corrupt else body)
    s3.put_object(Bucket=MEDIA_BUCKET, Key=f"{prefix}/notes.txt", Body=b"not media: skipped")


def vlmq(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**__import__("os").environ, **stack.env}
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, text=True, check=False
    )


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextmanager
def webhook_server() -> Iterator[tuple[str, list[tuple[dict, bytes]]]]:
    received: list[tuple[dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()


def test_a_prefix_batch_runs_to_the_end_and_its_counts_match_the_results_files(stack: Stack, tmp_path: Path) -> None:
    corrupt = {7, 50, 51, 123, 199}
    upload_prefix(stack, "shoes", 200, corrupt)
    env = {"VLMQ_WEBHOOK_SECRET": SECRET}
    stack.start_worker("--max-batch-size", "8", env=env)
    with webhook_server() as (url, received):
        sent = vlmq(
            stack,
            "batch",
            "submit",
            "--name",
            "shoes",
            "--max-new-tokens",
            "2",
            "-q",
            "--webhook",
            url,
            f"s3://{MEDIA_BUCKET}/shoes/",
        )
        assert sent.returncode == 0, sent.stderr
        watched = vlmq(stack, "batch", "status", "shoes", "--watch")
        wait_until(lambda: len(received) == 1, 30, "the webhook")
        status = json.loads(vlmq(stack, "batch", "status", "shoes", "--json").stdout)
        results = vlmq(stack, "batch", "results", "shoes", "-o", str(tmp_path / "out.jsonl"))
        as_parquet = vlmq(stack, "batch", "results", "shoes", "-o", str(tmp_path / "out.parquet"))

    assert watched.returncode == 1 and "shoes: completed_with_failures" in watched.stderr
    counts = {k: status[k] for k in ("status", "total", "queued", "running", "succeeded", "failed", "cancelled")}
    assert counts == {
        "status": "completed_with_failures",
        "total": 200,
        "queued": 0,
        "running": 0,
        "succeeded": 195,
        "failed": 5,
        "cancelled": 0,
    }
    assert results.returncode == 0, results.stderr
    out, errors = jsonl(tmp_path / "out.jsonl"), jsonl(tmp_path / "out.errors.jsonl")
    assert len(out) == 195 and {r["status"] for r in out} == {"succeeded"}
    failed_media = {
        json.loads(line)["media"][0]["uri"]
        for line in redis.Redis.from_url(stack.redis.url).hvals("vlmq:batch:shoes:failed")
    }
    assert failed_media == {f"s3://{MEDIA_BUCKET}/shoes/{i:03d}.png" for i in corrupt}
    assert [(r["status"], r["error"]["code"]) for r in errors] == [("failed", "media_undecodable")] * 5
    assert as_parquet.returncode == 0, as_parquet.stderr
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    failures = pq.read_table(tmp_path / "out.errors.parquet").to_pylist()
    assert [(r["id"], r["text"], r["attempts"]) for r in table] == [(r["id"], r["text"], r["attempts"]) for r in out]
    assert [(r["id"], r["error_code"]) for r in failures] == [(r["id"], "media_undecodable") for r in errors]
    # input order: the listing's key order
    jobs = [
        j
        for _, j in read_manifest(
            f"s3://{MEDIA_BUCKET}/shoes/", s3=stack.s3.client(), defaults={"max_new_tokens": 2}, batch="shoes"
        )
    ]
    assert [r["id"] for r in out] == [j.id for i, j in enumerate(jobs) if i not in corrupt]
    headers, body = received[0]
    assert headers["X-Vlmq-Signature"] == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Vlmq-Signature"] == signature(body, SECRET)
    event = json.loads(body)
    assert (event["event"], event["batch"]["status"], event["batch"]["failed"]) == (
        "batch.ended",
        "completed_with_failures",
        5,
    )

    # retry-failed: the corrupt objects are fixed, exactly the failed jobs run again and succeed.
    s3 = stack.s3.client()
    for i in corrupt:
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"shoes/{i:03d}.png", Body=encode(random_image(40, 30, seed=i), "PNG"))
    finished_before = count_in_logs(stack, r"job (\S+) finished: ")
    assert vlmq(stack, "batch", "retry-failed", "shoes").returncode == 0
    assert vlmq(stack, "batch", "status", "shoes", "--watch").returncode == 0
    rerun = count_in_logs(stack, r"job (\S+) finished: ") - finished_before
    assert set(rerun) == {jobs[i].id for i in corrupt} and set(rerun.values()) == {1}
    assert stack.client().batch("shoes").status().succeeded == 200


def test_an_interrupted_batch_resumed_runs_no_succeeded_job_twice(stack: Stack, tmp_path: Path) -> None:
    upload_prefix(stack, "resume", 120, corrupt=set())
    client = stack.client()
    worker = stack.start_worker("--max-batch-size", "4")
    prefix = f"s3://{MEDIA_BUCKET}/resume/"

    def submit() -> None:
        jobs = (j for _, j in read_manifest(prefix, s3=client.s3, defaults={"max_new_tokens": 2}, batch="resume"))
        client.submit_batch("resume", jobs, progress=False)

    submit()
    wait_until(lambda: client.batch("resume").status().succeeded >= 60, 120, "half the batch", worker.proc)
    worker.proc.send_signal(signal.SIGTERM)  # interrupted at ~50%
    assert worker.proc.wait(60) == 0
    halfway = client.batch("resume").status()
    redis.Redis.from_url(stack.redis.url).delete(stack.queue)  # and the queued rest is lost with the broker state
    submit()  # resubmit the same batch
    stack.start_worker("--max-batch-size", "4")
    wait_until(lambda: client.batch("resume").status().status == "completed", 180, "the resumed batch")

    runs = count_in_logs(stack, r"job (\S+) finished: ")
    with (tmp_path / "out.jsonl").open("w") as out:
        assert client.batch("resume").results(out) == (120, 0, 0)
    print(f"\nresume: 120 jobs, {halfway.succeeded} succeeded before the interruption, each ran once")
    assert 60 <= halfway.succeeded < 120
    assert sorted(runs.values()) == [1] * 120
    lines = jsonl(tmp_path / "out.jsonl")
    assert [line["id"] for line in lines] == [i for ids in client.batches.ids("resume") for i in ids]

    # The same jobs run without interruption (other ids: their metadata differs) give the same texts, line by line.
    again = read_manifest(prefix, s3=client.s3, defaults={"max_new_tokens": 2, "metadata": {"run": "2"}})
    client.submit_batch("uninterrupted", (j for _, j in again), progress=False)
    wait_until(lambda: client.batch("uninterrupted").status().status == "completed", 180, "the uninterrupted batch")
    with (tmp_path / "uninterrupted.jsonl").open("w") as out:
        assert client.batch("uninterrupted").results(out) == (120, 0, 0)
    assert [line["text"] for line in jsonl(tmp_path / "uninterrupted.jsonl")] == [line["text"] for line in lines]


def test_a_cancelled_batch_ends_its_unstarted_jobs_cancelled_without_model_work(stack: Stack) -> None:
    upload_prefix(stack, "cancel", 30, corrupt=set())
    client = stack.client()
    jobs = [Job(media=[f"s3://{MEDIA_BUCKET}/cancel/{i:03d}.png"], max_new_tokens=2) for i in range(30)]
    client.submit_batch("to-cancel", jobs, progress=False)
    client.batch("to-cancel").cancel()
    stack.start_worker("--max-batch-size", "4")
    wait_until(lambda: client.batch("to-cancel").status().status == "cancelled", 120, "the cancelled batch")

    results = client.collect([j.id for j in jobs], progress=False, timeout=30)
    assert [(r.status, r.error and r.error.code) for r in results] == [("failed", "cancelled")] * 30
    assert count_in_logs(stack, SUCCEEDED) == {}
    assert client.batch("to-cancel").status().cancelled == 30


def test_a_malformed_manifest_names_each_bad_line_and_enqueues_nothing(stack: Stack, tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.jsonl"
    lines = [
        '{"custom_id": "ok-1", "media": ["s3://b/1.png"]}',
        "{not json",
        '["a", "list"]',
        '{"custom_id": "bad/id", "media": ["s3://b/2.png"]}',
        '{"task": "qa", "media": ["s3://b/3.png"]}',
        '{"media": ["ftp://b/4.png"]}',
        '{"media": ["s3://b/5.txt"]}',
        "",
        '{"media": ["s3://b/6.png"], "max_new_tokens": 0}',
        '{"media": ["s3://b/7.png"], "colour": "red"}',
    ]
    manifest.write_text("\n".join(lines) + "\n")
    done = vlmq(stack, "batch", "submit", "--name", "bad", "--manifest", str(manifest))
    assert done.returncode == 2
    reported = [line.strip().split(":")[0] for line in done.stderr.splitlines() if line.strip().startswith("line ")]
    assert reported == ["line 2", "line 3", "line 4", "line 5", "line 6", "line 7", "line 9", "line 10"]
    assert 'line 5: job: Value error, task "qa" needs "question"' in done.stderr
    assert "8 bad lines, nothing was enqueued" in done.stderr
    r = redis.Redis.from_url(stack.redis.url)
    assert r.llen(stack.queue) == 0 and not r.exists("vlmq:batch:bad")

    csv_manifest = tmp_path / "jobs.csv"
    csv_manifest.write_text("uri,task,question\ns3://b/1.png,qa,What is it?\ns3://b/2.png,qa,\n,caption,\n")
    checked = vlmq(stack, "batch", "validate", "--manifest", str(csv_manifest))
    assert checked.returncode == 2
    assert [line.strip()[:7] for line in checked.stderr.splitlines() if line.strip().startswith("line ")] == [
        "line 3:",
        "line 4:",
    ]


def test_cancelling_the_last_open_job_of_a_batch_ends_the_batch_and_calls_its_webhook_once(stack: Stack) -> None:
    upload_prefix(stack, "last", 2, corrupt=set())
    client = stack.client()
    jobs = [Job(media=[f"s3://{MEDIA_BUCKET}/last/{i:03d}.png"], max_new_tokens=2) for i in range(2)]
    with webhook_server() as (url, received):
        client.submit_batch("last-cancelled", jobs, webhook=url, progress=False)
        first = client.cancel(jobs[0].id)
        assert client.batch("last-cancelled").status().status == "running"
        last = client.cancel(jobs[1].id)  # no worker ever ran: every end is a cancel
        wait_until(lambda: len(received) == 1, 30, "the webhook")
        status = client.batch("last-cancelled").status()

    assert [r and (r.status, r.error and r.error.code) for r in (first, last)] == [("failed", "cancelled")] * 2
    assert (status.status, status.total, status.cancelled, status.queued) == ("cancelled", 2, 2, 0)
    event = json.loads(received[0][1])
    assert (event["event"], event["batch"]["name"], event["batch"]["cancelled"]) == ("batch.ended", "last-cancelled", 2)
    assert [r.error and r.error.code for r in client.collect([j.id for j in jobs], progress=False, timeout=10)] == [
        "cancelled",
        "cancelled",
    ]
    assert len(received) == 1
