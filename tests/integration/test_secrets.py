"""Credentials pass through to Redis and S3 and never show up in a worker's log or in results."""

from __future__ import annotations

from pathlib import Path

import redis

from producer import Client, ClientSettings, Job
from tests.conftest import RESULTS_BUCKET, Stack
from tests.helpers import upload_images
from worker.devtools.local_services import RedisServer

PASSWORD = "s3cr3t-redis-Pa55word"


def test_a_password_protected_redis_works_and_no_secret_reaches_logs_or_results(stack: Stack, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis-auth").start()
    try:
        redis.Redis(host="127.0.0.1", port=server.port).config_set("requirepass", PASSWORD)
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        uris = upload_images(stack, "secrets", 2)
        worker = stack.start_worker("--max-batch-size", "2", env={"VLMQ_BROKER_URL": url})
        client = Client(
            ClientSettings(
                broker_url=url, s3_endpoint_url=stack.s3.endpoint_url, results_bucket=RESULTS_BUCKET, queue=stack.queue
            )
        )
        jobs = [Job(media=[uris[0]], max_new_tokens=4), Job(media=["s3://vlmq-test-media/missing.png"])]
        results = client.run(jobs, progress=False, timeout=120)
        stored = stack.s3.client().get_object(Bucket=RESULTS_BUCKET, Key=f"results/{results[1].id}.json")
    finally:
        stack.stop_workers()
        server.stop()

    assert [(r.status, r.error and r.error.code) for r in results] == [
        ("succeeded", None),
        ("failed", "media_not_found"),
    ]
    log = worker.log_path.read_text()
    assert "ready." in log and "redis://:**@127.0.0.1" in log  # Celery's banner shows the URL, masked
    secrets = (PASSWORD, stack.env["AWS_SECRET_ACCESS_KEY"])
    assert [s for s in secrets if s in log] == []
    assert [s for s in secrets for r in results if s in r.model_dump_json()] == []
    assert [s for s in secrets if s in stored["Body"].read().decode()] == []
