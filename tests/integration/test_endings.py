"""Every way a job ends, recorded by the one path (producer/core/endings.py through worker.lifecycle.Finisher), and
`JobRun` over every decision of the lifecycle: in this process, on a real Redis and SeaweedFS, with the real pipeline
in front of an engine that answers at once (no model). What each ending leaves where is the contract the README's
reliability guarantees rest on: the S3 result, Celery's result, the ledger, the dead letters, the batch counts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.exceptions import Retry
from celery.result import AsyncResult

from producer.core.endings import Endings
from producer.core.jobs import Job, JobError, JobResult
from producer.core.ledger import Ledger
from producer.core.results import ResultStore
from producer.core.storage import make_s3_client
from tests.conftest import MEDIA_BUCKET, RESULTS_BUCKET
from tests.reference import encode, random_image
from worker.app import create_app
from worker.engines.base import Generated
from worker.errors import InferenceError, MediaUnavailable, ResultWriteFailed
from worker.lifecycle import Finisher
from worker.metrics import Metrics
from worker.pipeline import Pipeline
from worker.settings import WorkerSettings
from worker.tasks import JobRun, RunJob, Services


def settings_for(redis_url: str, s3_url: str, bucket: str = RESULTS_BUCKET) -> WorkerSettings:
    return WorkerSettings(
        broker_url=redis_url,
        s3_endpoint_url=s3_url,
        results_bucket=bucket,
        redis_namespace=f"endings-{uuid.uuid4().hex[:8]}",
        queue=f"q-{uuid.uuid4().hex[:8]}",
        max_crashes=2,
        max_retries=2,
        preprocess_workers=0,
    )


class Answering:
    """An engine (`worker.engines.base.Engine`) that answers each job at once: `text`, or `error` raised."""

    name = "answering"
    max_batch_size = 8

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.runs = 0

    def prepare(self, conversation: Any, images: Any, videos: Any, generation: Any) -> str:
        return "request"

    def add(self, job_id: str, request: Any) -> Future[Generated]:
        self.runs += 1
        done: Future[Generated] = Future()
        if self.error is not None:
            done.set_exception(self.error)
        else:
            done.set_result(Generated("a caption", batch_size=1))
        return done

    def probe(self) -> None:
        return None

    def busy_for(self) -> float | None:
        return None

    def close(self) -> None:
        return None


@dataclass
class World:
    settings: WorkerSettings
    endings: Endings
    finisher: Finisher
    metrics: Metrics
    engine: Answering
    task: RunJob
    uri: str

    @property
    def ledger(self) -> Ledger:
        return self.endings.ledger

    def run(self, payload: dict[str, Any], *, redelivered: bool = False, retries: int = 0) -> dict[str, Any]:
        self.task.push_request(id=payload["id"], retries=retries, delivery_info={}, called_directly=False)
        try:
            return JobRun(self.task, self.task.services, payload).run(force=False, redelivered=redelivered)
        finally:
            self.task.pop_request()

    def stored(self, job_id: str) -> JobResult | None:
        return self.endings.results.read(job_id)

    def in_backend(self, job_id: str) -> Any:
        return AsyncResult(job_id, app=self.task.app).result

    def jobs_metric(self, status: str, code: str = "") -> float:
        return self.metrics.jobs.labels(status, code)._value.get()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "vlmq"), ("AWS_SECRET_ACCESS_KEY", "vlmq-secret")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def world(redis_server: Any, s3_server: Any) -> Iterator[World]:
    settings = settings_for(redis_server.url, s3_server.endpoint_url)
    s3 = make_s3_client(settings)
    s3.put_object(Bucket=MEDIA_BUCKET, Key="endings/a.png", Body=encode(random_image(40, 30, seed=3), "PNG"))
    app = create_app(settings)
    metrics = Metrics()
    endings = Endings(ResultStore(s3, settings), Ledger(settings), None, app.backend)
    finisher = Finisher(endings, metrics)
    engine = Answering()
    pipeline = Pipeline(settings, engine, s3, endings.results, metrics)  # type: ignore[arg-type]
    task = app.register_task(RunJob(Services(pipeline, endings.ledger, finisher)))
    yield World(settings, endings, finisher, metrics, engine, task, f"s3://{MEDIA_BUCKET}/endings/a.png")
    pipeline.close()


def failed(job_id: str, code: str = "inference_failed", retryable: bool = False) -> JobResult:
    error = JobError(code=code, message="it failed", retryable=retryable)  # type: ignore[arg-type]
    return JobResult(id=job_id, status="failed", error=error, attempts=1)


def in_batch(world: World, name: str, *job_ids: str) -> None:
    world.endings.batches.begin(name, None)
    world.endings.batches.add(name, list(job_ids), [], [])
    world.endings.batches.close_submission(name)


# -- Finisher: what each ending records where -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("how", "s3", "backend", "counted", "dead"),
    [
        ({}, True, False, True, False),  # it ran: the task returns it to Celery
        ({"write_s3": False}, False, False, False, False),  # a copy found its stored success
        ({"to_backend": True}, True, True, True, False),  # refused by the gate, or cancelled: no task returns it
        ({"dead": True}, True, False, True, True),  # retries ran out
    ],
    ids=["ran", "stored", "refused", "dead"],
)
def test_each_ending_records_the_result_where_it_belongs_and_counts_it_in_its_batch(
    world: World, how: dict[str, bool], s3: bool, backend: bool, counted: bool, dead: bool
) -> None:
    job_id = str(uuid.uuid4())
    in_batch(world, "b", job_id, "other")
    result = failed(job_id)
    world.ledger.record_started(job_id, 0)

    world.finisher.finish(result, {"id": job_id, "batch": "b"}, **how)

    assert (world.stored(job_id) == result) is s3
    assert (world.in_backend(job_id) == result.model_dump(mode="json")) is backend
    assert world.jobs_metric("failed", "inference_failed") == (1 if counted else 0)
    assert [d.result.id for d in world.ledger.dead_letters()] == ([job_id] if dead else [])
    status = world.endings.batches.status("b")
    assert (status.failed, status.queued, status.status) == (1, 1, "running")
    assert world.ledger.record_started(job_id, 0) == (1, False)  # its starts were forgotten: the run is over


def test_the_last_job_of_a_batch_announces_its_end_once(world: World) -> None:
    pubsub = world.ledger.redis.pubsub()
    pubsub.subscribe(world.ledger.keys.batch_events())
    pubsub.get_message(timeout=5)  # the subscription's confirmation
    first, last = str(uuid.uuid4()), str(uuid.uuid4())
    in_batch(world, "two", first, last)

    world.finisher.finish(JobResult(id=first, status="succeeded", text="x", attempts=1), {"batch": "two"})
    assert pubsub.get_message(timeout=1) is None
    world.finisher.finish(failed(last), {"batch": "two"}, to_backend=True)

    message = pubsub.get_message(timeout=5)
    assert message is not None and b'"batch.ended"' in message["data"]
    assert pubsub.get_message(timeout=1) is None
    assert world.endings.batches.status("two").status == "completed_with_failures"


def test_a_result_that_cannot_be_written_is_told_and_the_rest_of_its_end_is_recorded(
    redis_server: Any, s3_server: Any
) -> None:
    settings = settings_for(redis_server.url, s3_server.endpoint_url, bucket="no-such-bucket")
    endings = Endings(ResultStore(make_s3_client(settings), settings), Ledger(settings))
    seen: list[ResultWriteFailed] = []
    job_id = str(uuid.uuid4())

    Finisher(endings, Metrics()).finish(failed(job_id), {}, dead=True, write_failed=seen.append)

    assert [type(e) for e in seen] == [ResultWriteFailed] and seen[0].retryable
    assert [d.result.id for d in endings.ledger.dead_letters()] == [job_id]


# -- JobRun: each decision of the lifecycle -------------------------------------------------------------------------
def payload(world: World, **fields: Any) -> dict[str, Any]:
    job = Job(media=[world.uri], max_new_tokens=4, **fields)
    return job.model_dump(mode="json", exclude_none=True)


def test_a_job_runs_and_its_success_is_stored_once(world: World) -> None:
    job = payload(world)
    returned = world.run(job)
    assert (returned["status"], returned["text"], returned["attempts"]) == ("succeeded", "a caption", 1)
    assert world.stored(job["id"]) == JobResult.model_validate(returned)
    assert world.ledger.has_succeeded(job["id"]) and world.engine.runs == 1


def test_a_redelivered_copy_of_a_job_that_succeeded_returns_the_stored_result_without_running(world: World) -> None:
    job = payload(world)
    first = world.run(job)
    again = world.run(job, redelivered=True)
    assert again == first and world.engine.runs == 1
    assert world.jobs_metric("succeeded") == 1  # the stored result was counted when it ran


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"submitted_at": datetime.now(UTC) - timedelta(minutes=5), "ttl_s": 60}, "expired"),
        ({"batch": "cancelled-batch"}, "cancelled"),
    ],
    ids=["ttl", "cancelled-batch"],
)
def test_a_job_past_its_time_to_live_or_in_a_cancelled_batch_ends_without_running(
    world: World, fields: dict[str, Any], code: str
) -> None:
    world.endings.batches.begin("cancelled-batch", None)
    world.endings.batches.cancel("cancelled-batch")
    job = payload(world, **fields)
    returned = world.run(job)
    assert (returned["status"], returned["error"]["code"], world.engine.runs) == ("failed", code, 0)
    assert world.stored(job["id"]) == JobResult.model_validate(returned)


def test_a_job_whose_celery_expires_passed_ends_expired_without_running(world: World) -> None:
    job = payload(world)
    world.task.services.deadlines.put(job["id"], datetime.now(UTC) - timedelta(seconds=1))
    returned = world.run(job)
    assert (returned["error"]["code"], world.engine.runs) == ("expired", 0)
    assert "Celery expires" in returned["error"]["message"]


def test_a_job_workers_died_running_is_dead_lettered_worker_lost(world: World) -> None:
    job = payload(world)
    world.ledger.record_started(job["id"], 0)
    world.ledger.record_started(job["id"], 0)  # two starts that never ended: VLMQ_MAX_CRASHES=2 crashes
    returned = world.run(job, redelivered=True)
    assert (returned["error"]["code"], world.engine.runs) == ("worker_lost", 0)
    assert [d.result.id for d in world.ledger.dead_letters()] == [job["id"]]


def test_an_invalid_job_fails_invalid_job(world: World) -> None:
    returned = world.run({"id": str(uuid.uuid4()), "task": "qa", "media": [world.uri]})  # qa without a question
    assert (returned["status"], returned["error"]["code"]) == ("failed", "invalid_job")


def test_a_retryable_failure_is_retried_while_retries_are_left_then_ends_dead_lettered(world: World) -> None:
    world.engine.error = MediaUnavailable("the store is throttling")
    job = payload(world)
    with pytest.raises(Retry):
        world.run(job)
    returned = world.run(job, retries=2)  # VLMQ_MAX_RETRIES=2: none left
    assert (returned["error"]["code"], returned["error"]["retryable"]) == ("media_unavailable", True)
    assert [d.result.id for d in world.ledger.dead_letters()] == [job["id"]]


def test_a_redelivered_copy_of_a_job_that_failed_returns_its_stored_failure_and_a_resubmission_runs(
    world: World,
) -> None:
    world.engine.error = InferenceError("the model failed")
    job = payload(world, submitted_at=datetime.now(UTC))  # as every producer and the gate stamp it
    failure = world.run(job)
    world.engine.error = None
    assert world.run(job, redelivered=True) == failure and world.engine.runs == 1  # one end for the submission
    again = {**job, "submitted_at": datetime.now(UTC).isoformat()}  # the same id sent again (a new submission)
    assert world.run(again)["status"] == "succeeded" and world.engine.runs == 2


def test_a_failure_after_another_copy_succeeded_keeps_the_success(world: World) -> None:
    job = payload(world)
    success = world.run(job)
    world.engine.error = InferenceError("the model failed")
    assert world.run(job, redelivered=False) == success  # a duplicate message, not a redelivery
    assert world.stored(job["id"]) == JobResult.model_validate(success)
