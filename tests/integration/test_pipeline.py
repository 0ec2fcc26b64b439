"""The core pipeline through real processes: Client -> Redis -> `vlmq worker` (tiny model) -> Redis + S3."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from celery import Celery
from celery.result import AsyncResult
from PIL import Image

from producer import Job
from producer.core.jobs import Generation
from tests.conftest import MEDIA_BUCKET, RESULTS_BUCKET, Stack
from tests.reference import encode, random_image, reference_text

MAX_NEW_TOKENS = 12
DEFAULT_CAPTION_PROMPT = "Describe this image in detail."
# (width, height, format): 7 sizes and aspect ratios, square to 5:1 either way, JPEG and PNG.
IMAGES = [
    (32, 32, "PNG"),
    (640, 480, "JPEG"),
    (480, 640, "PNG"),
    (1000, 200, "JPEG"),
    (150, 600, "PNG"),
    (384, 384, "JPEG"),
    (97, 61, "PNG"),
]
QUESTIONS = ["What is in the picture?", "How many people are there?", "What colour is the sky?"]


def upload_images(stack: Stack, prefix: str) -> dict[str, bytes]:
    s3 = stack.s3.client()
    objects = {}
    for i, (w, h, fmt) in enumerate(IMAGES):
        key = f"{prefix}/img-{i}-{w}x{h}.{fmt.lower().replace('jpeg', 'jpg')}"
        body = encode(random_image(w, h, seed=i), fmt)
        s3.put_object(Bucket=MEDIA_BUCKET, Key=key, Body=body)
        objects[f"s3://{MEDIA_BUCKET}/{key}"] = body
    return objects


def mixed_jobs(uris: list[str], count: int) -> list[Job]:
    """`count` jobs over `uris`: captions and questions alternating, one with a custom caption prompt."""
    generation = Generation(max_new_tokens=MAX_NEW_TOKENS)
    jobs = []
    for i in range(count):
        uri = uris[i % len(uris)]
        if i % 2:
            jobs.append(Job(task="qa", media=[uri], question=QUESTIONS[i % 3], generation=generation))
        elif i == 4:
            jobs.append(Job(task="caption", media=[uri], prompt="Write one short sentence.", generation=generation))
        else:
            jobs.append(Job(task="caption", media=[uri], generation=generation, metadata={"n": str(i)}))
    return jobs


def expected_text(stack: Stack, job: Job, objects: dict[str, bytes]) -> str:
    images = [Image.open(io.BytesIO(objects[m.uri])).convert("RGB") for m in job.media]
    text = job.question or job.prompt or DEFAULT_CAPTION_PROMPT
    return reference_text(stack.model, images, text, MAX_NEW_TOKENS)


@pytest.mark.parametrize("preprocess_workers", ["2", "0"], ids=["pool", "in-process"])
def test_batched_jobs_return_exactly_the_model_card_text_for_each_job_alone(
    stack: Stack, preprocess_workers: str
) -> None:
    objects = upload_images(stack, f"fidelity-{preprocess_workers}")
    jobs = mixed_jobs(list(objects), 16)
    stack.start_worker("--preprocess-workers", preprocess_workers, "--max-batch-size", "4", "--max-wait-ms", "300")

    results = stack.client().run(jobs, progress=False, timeout=300)

    assert [r.id for r in results] == [j.id for j in jobs]
    assert [r.status for r in results] == ["succeeded"] * len(jobs)
    assert [r.text for r in results] == [expected_text(stack, j, objects) for j in jobs]
    assert [r.metadata for r in results] == [j.metadata for j in jobs]
    assert {r.model for r in results} == {str(stack.model)}


def test_jobs_in_flight_together_share_batches_up_to_the_maximum(stack: Stack) -> None:
    objects = upload_images(stack, "batching")
    jobs = mixed_jobs(list(objects), 16)
    client = stack.client()
    handles = [client.submit(job) for job in jobs]  # queued before the worker starts: all in flight at once
    stack.start_worker("--max-batch-size", "4", "--max-wait-ms", "500")

    results = [h.result(timeout=300) for h in handles]

    sizes = [r.batch_size for r in results]
    assert all(r.ok for r in results)
    assert max(s for s in sizes if s is not None) > 1
    assert all(s is not None and 1 <= s <= 4 for s in sizes)


def test_bad_media_fails_alone_with_its_own_code_and_the_worker_keeps_serving(stack: Stack) -> None:
    objects = upload_images(stack, "bad")
    s3 = stack.s3.client()
    s3.put_object(Bucket=MEDIA_BUCKET, Key="bad/not-an-image.jpg", Body=b"plain text, not a JPEG")
    s3.put_object(Bucket=MEDIA_BUCKET, Key="bad/empty.png", Body=b"")
    good = mixed_jobs(list(objects), 6)
    generation = Generation(max_new_tokens=MAX_NEW_TOKENS)
    bad = [
        Job(media=[f"s3://{MEDIA_BUCKET}/bad/missing.jpg"], generation=generation),
        Job(media=[f"s3://{MEDIA_BUCKET}/bad/not-an-image.jpg"], generation=generation),
        Job(media=[f"s3://{MEDIA_BUCKET}/bad/empty.png"], generation=generation),
        Job(media=["https://example.com/cat.jpg"], generation=generation),
        Job(media=["file:///etc/passwd.png"], generation=generation),
    ]
    jobs = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], good[4], bad[4], good[5]]
    stack.start_worker("--max-batch-size", "4", "--max-wait-ms", "300")
    client = stack.client()

    results = {r.id: r for r in client.run(jobs, progress=False, timeout=300)}

    assert [(results[j.id].status, results[j.id].error.code if results[j.id].error else None) for j in bad] == [
        ("failed", "media_not_found"),
        ("failed", "media_undecodable"),
        ("failed", "media_undecodable"),
        ("failed", "media_forbidden"),
        ("failed", "media_forbidden"),
    ]
    assert all(results[j.id].error.retryable is False for j in bad)  # type: ignore[union-attr]
    assert [results[j.id].text for j in good] == [expected_text(stack, j, objects) for j in good]
    after = client.submit(mixed_jobs(list(objects), 1)[0]).result(timeout=120)
    assert after.status == "succeeded"


def test_a_malformed_job_sent_straight_to_the_broker_fails_as_invalid_job(stack: Stack) -> None:
    stack.start_worker()
    app = Celery(broker=stack.redis.url, backend=stack.redis.url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    app.send_task("vlmq.run", args=[{"task": "qa", "media": ["s3://b/x.jpg"]}], task_id="raw-1", queue=stack.queue)

    result = stack.client().result("raw-1", timeout=120)

    assert result.status == "failed"
    assert result.error is not None and result.error.code == "invalid_job"
    assert "question" in result.error.message


def test_the_s3_result_object_and_the_redis_result_are_the_same_json(stack: Stack) -> None:
    objects = upload_images(stack, "same")
    job = mixed_jobs(list(objects), 1)[0]
    stack.start_worker()
    client = stack.client()
    client.submit(job).result(timeout=120)

    redis_value = AsyncResult(job.id, app=client.celery).result
    body = stack.s3.client().get_object(Bucket=RESULTS_BUCKET, Key=f"results/{job.id}.json")["Body"].read()

    assert json.loads(body) == redis_value
    assert redis_value["id"] == job.id and redis_value["status"] == "succeeded"


def test_cli_submit_wait_and_result_print_the_job_result(stack: Stack) -> None:
    objects = upload_images(stack, "cli")
    uri = next(iter(objects))
    stack.start_worker()
    env = {**stack.env, "PATH": __import__("os").environ["PATH"]}
    cli = [sys.executable, "-m", "producer.cli"]

    submitted = subprocess.run(
        [*cli, "submit", "--task", "qa", "--question", "What is this?", "--max-new-tokens", "8", uri],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip()
    shown = subprocess.run([*cli, "result", job_id, "--wait", "120"], env=env, capture_output=True, text=True)
    waited = subprocess.run(
        [*cli, "submit", "--wait", "-q", "--max-new-tokens", "8", f"s3://{MEDIA_BUCKET}/cli/missing.png"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    image = Image.open(io.BytesIO(objects[uri])).convert("RGB")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["text"] == reference_text(stack.model, [image], "What is this?", 8)
    assert waited.returncode == 1
    assert json.loads(waited.stdout)["error"]["code"] == "media_not_found"
