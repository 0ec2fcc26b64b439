"""One worker process's pipeline: validate a job, load its media, hand it to the engine, build its result.

`Pipeline.execute` runs in a Celery task thread. Everything up to `Engine.add` (S3 reads, decoding, the
engine's `prepare`) happens in the preprocessing processes (worker/preprocess.py) while that thread waits, or in
the thread itself with `--preprocess-workers 0`, concurrently with the engine's model calls for earlier jobs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from producer.core.jobs import Job, JobResult, Timings, Usage, describe_invalid
from producer.core.results import ResultStore
from worker.batcher import Incoming
from worker.engines import Engine, preparation, start_engine
from worker.errors import DecodeHung, InvalidJob, VlmqError
from worker.hooks import Hooks
from worker.metrics import Metrics
from worker.pool import PreprocessPool
from worker.preprocess import Preprocessor
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def parse_job(payload: Any, task_id: str | None = None) -> Job:
    """Validate a message body against the contract; the Celery task id is the job id when the body has none."""
    if not isinstance(payload, dict):
        raise InvalidJob(f"a job must be a JSON object, got {type(payload).__name__}")
    if task_id and "id" not in payload:
        payload = {**payload, "id": task_id}
    elif task_id and payload["id"] != task_id:
        raise InvalidJob(
            f"the job's id {payload['id']!r} differs from its message's task id {task_id!r}; send the job with "
            "producer.Client, or with task_id equal to its id"
        )
    try:
        return Job.model_validate(payload)
    except ValidationError as exc:
        raise InvalidJob(f"invalid job: {describe_invalid(exc)}") from None


@dataclass
class Outcome:
    """What `execute` learned about a job before its result is built."""

    text: str
    batch_size: int
    timings: Timings
    usage: Usage | None = None


class Pipeline:
    """Media fetcher, engine and result store of one worker process."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        s3_client: Any,
        results: ResultStore,
        metrics: Metrics | None = None,
        hooks: Hooks | None = None,
        pool: PreprocessPool | None = None,
        incoming: Incoming | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.hooks = hooks or Hooks()
        self.preprocess = Preprocessor(settings, s3_client, engine.prepare, self.hooks)
        self.pool = pool
        self.results = results
        self.incoming = Incoming() if incoming is None else incoming
        self.worker_name = settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.restart_requested = False

    @classmethod
    def start(
        cls, settings: WorkerSettings, s3_client: Any, results: ResultStore, metrics: Metrics, hooks: Hooks
    ) -> Pipeline:
        """Load the model with the configured engine (once per process) and start its threads and preprocessing
        processes."""
        incoming = Incoming()
        pool = None
        if settings.preprocess_processes:
            pool = PreprocessPool(settings, settings.preprocess_processes, preparation(settings, hooks), hooks)
            pool.start()  # they load their processors while the engine loads the model
        try:
            hooks.loading()
            engine = start_engine(settings, metrics, hooks, incoming)
            if pool is not None:
                pool.wait_ready(metrics)
        except BaseException:
            if pool is not None:
                pool.close()
            raise
        return cls(settings, engine, s3_client, results, metrics, hooks, pool, incoming)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.engine.close()

    def restart_when_idle(self, reason: str) -> None:
        """Ask for a warm shutdown (SIGTERM to this process): running jobs finish, unstarted ones stay queued, and
        the supervisor starts a fresh process."""
        log.critical("%s: this worker stops taking jobs and exits after its running ones, to be restarted", reason)
        self.restart_requested = True
        self.metrics.ready.set(0)
        os.kill(os.getpid(), signal.SIGTERM)

    def execute(self, job: Job) -> Outcome:
        """Fetch, decode, prepare and generate for one job; raises a `VlmqError` on failure."""
        queued_ms = None
        if job.submitted_at is not None:
            queued_ms = max(0.0, (datetime.now(UTC) - job.submitted_at).total_seconds() * 1000)
            self.metrics.queue_wait.observe(queued_ms / 1000)
        started = time.perf_counter()
        # The engine's batcher waits for batch-mates only while jobs are on their way: this one is until it is added.
        with self.incoming.job():
            request = self._prepare(job)
            fetched = time.perf_counter()
            running = self.engine.add(job.id, request)
        self.metrics.media_seconds.observe(fetched - started)
        generated = running.result()
        done = time.perf_counter()
        timings = Timings(queued=queued_ms, fetch=(fetched - started) * 1000, infer=(done - fetched) * 1000)
        usage = Usage(prompt_tokens=generated.prompt_tokens, completion_tokens=generated.tokens)
        return Outcome(text=generated.text, batch_size=generated.batch_size, timings=timings, usage=usage)

    def _prepare(self, job: Job) -> Any:
        """Fetch, decode and prepare one job's media: in the preprocessing pool, or in this thread."""
        self.hooks.job([item.uri for item in job.all_media()])
        try:
            request = self.pool.submit(job).result() if self.pool is not None else self.preprocess(job)
        except DecodeHung:
            if self.pool is None:  # the hung decoder holds a thread of this process; in the pool, its own process
                self.restart_when_idle("a video decoder hung")
            raise
        return request

    def succeeded(self, job: Job, outcome: Outcome, attempts: int) -> JobResult:
        return JobResult(
            id=job.id,
            status="succeeded",
            text=outcome.text,
            model=self.engine.name,
            worker=self.worker_name,
            attempts=attempts,
            batch_size=outcome.batch_size,
            usage=outcome.usage,
            timings=outcome.timings,
            metadata=job.metadata,
        )

    def failed(self, job_id: str, error: VlmqError, attempts: int, metadata: dict[str, str] | None = None) -> JobResult:
        return JobResult(
            id=job_id,
            status="failed",
            error=error.to_job_error(),
            model=self.engine.name,
            worker=self.worker_name,
            attempts=attempts,
            metadata=metadata or {},
        )
