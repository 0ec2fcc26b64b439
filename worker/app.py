"""The worker's Celery app: the only module that configures Celery, and the entry point of `vlmq worker`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutting_down
from celery.worker import state as worker_state

from producer.core.broker import queue_lists
from producer.core.celery_config import celery_config
from producer.core.ledger import Ledger
from producer.core.periodic import Periodic
from producer.core.publish import Publisher
from producer.core.results import ResultReader, ResultStore
from producer.core.served import ANNOUNCE_EVERY_S, announce
from producer.core.storage import make_s3_client
from worker.errors import ConfigError
from worker.settings import WorkerSettings

if TYPE_CHECKING:  # the runtime imports stay inside run_worker: `create_app` alone must not load torch
    from worker.health import Health
    from worker.hooks import Hooks
    from worker.metrics import Metrics
    from worker.pipeline import Pipeline
    from worker.recovery import Recovery

log = logging.getLogger(__name__)


def create_app(settings: WorkerSettings) -> Celery:
    """A Celery app for a GPU worker: JSON only, late acks, one message reserved per free task thread."""
    app = Celery("vlmq", set_as_current=False)
    app.conf.update(
        celery_config(settings),
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        # A result stored while Redis restarts is retried (for up to a minute) instead of being lost with its
        # message: the message is acknowledged either way. (Cancelling running tasks on connection loss,
        # worker_cancel_long_running_tasks_on_connection_loss, cannot work with the threads pool: it has no kill.)
        result_backend_always_retry=True,
        result_backend_max_retries=30,
        result_backend_base_sleep_between_retries_ms=100,
        result_backend_max_sleep_between_retries_ms=5000,
        worker_hijack_root_logger=False,
        # Celery sends task events only when asked (-E): on by default so `celery events` and Flower see jobs
        # without a `celery control enable_events` after every worker start.
        worker_send_task_events=settings.task_events,
    )
    return app


@dataclass
class Clients:
    """The Redis, S3 and Celery clients of one worker process, built once and shared by all its parts.

    The liveness probe's Redis client is the one exception, on purpose: it has its own short timeouts, so that a slow
    Redis cannot make the probe itself time out (a restart would not help; the consumer reconnects by itself).
    """

    celery: Celery
    ledger: Ledger  # holds the Redis client (`ledger.redis`), shared with the batch store and the recovery sweep
    s3: Any
    results: ResultStore
    reader: ResultReader
    publisher: Publisher

    @classmethod
    def connect(cls, settings: WorkerSettings) -> Clients:
        celery = create_app(settings)
        ledger = Ledger(settings)
        # boto3 clients are thread-safe: one serves every task thread (media reads) and the result writes.
        s3 = make_s3_client(settings, max_connections=settings.in_flight + 4)
        results = ResultStore(s3, settings)
        return cls(celery, ledger, s3, results, ResultReader(celery, results), Publisher(celery, ledger))


def run_worker(settings: WorkerSettings, hooks: Hooks | None = None) -> None:
    """Check what the worker needs, load the model, then consume jobs until stopped (SIGTERM/SIGINT: warm shutdown).
    `hooks`: what acts at the runtime's seams (worker/hooks.py; `vlmq worker` passes fault injection's when
    VLMQ_FAULTS is set).

    Raises:
        ConfigError, CannotStart: the worker cannot start here; the message says why and what to do.
    """
    from worker import allocator
    from worker.hooks import Hooks
    from worker.metrics import Metrics
    from worker.pipeline import Pipeline
    from worker.preflight import check_model, check_start
    from worker.watchdog import EXIT_RESTART

    check_model(settings.model)
    clients = Clients.connect(settings)
    check_start(settings, clients.s3)
    if not settings.results_bucket:
        log.warning(
            "VLMQ_RESULTS_BUCKET is not set: results go to Redis only, and expire after %d s", settings.result_expires_s
        )
    log.info("memory allocator: %s", allocator.configure(settings.allocator))
    metrics = Metrics()
    health = _serve_health(settings, metrics)
    try:
        pipeline = Pipeline.start(settings, clients.s3, clients.results, metrics, hooks or Hooks())
    except ConfigError:
        raise
    except Exception as exc:  # a checkpoint the engine cannot load, no memory for it: one line, not a traceback
        log.debug("the engine did not start", exc_info=True)
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(
            f"the model {settings.model} could not be loaded: {type(exc).__name__}: {reason} "
            "(`vlmq -v worker ...` shows the traceback)"
        ) from exc
    health.batch_age = pipeline.engine.busy_for
    health.probe = pipeline.engine.probe
    sweeping = _wire(settings, clients, pipeline, health)
    in_flight = settings.concurrency or 2 * pipeline.engine.max_batch_size
    log.info(
        "worker %s loaded model %s, max batch %d, max wait %.0f ms, %d jobs in flight, queues %s",
        pipeline.worker_name,
        settings.model,
        pipeline.engine.max_batch_size,
        settings.max_wait_ms,
        in_flight,
        " then ".join(settings.queues),
    )
    try:
        clients.celery.worker_main(_worker_argv(settings, pipeline.worker_name, in_flight))
    finally:
        sweeping.stop()
        pipeline.close()
        if pipeline.restart_requested:  # a warm shutdown asked for by the worker itself: not a clean stop
            raise SystemExit(EXIT_RESTART)


def _serve_health(settings: WorkerSettings, metrics: Metrics) -> Health:
    from worker.health import Health

    health = Health(metrics, settings.liveness_stall_s)
    if settings.metrics_port:
        health.serve(settings.metrics_port)
        log.info("metrics and probes on :%d (/metrics, /livez, /readyz)", settings.metrics_port)
    return health


def _wire(settings: WorkerSettings, clients: Clients, pipeline: Pipeline, health: Health) -> Periodic:
    """Register the task, put the gate in front of Celery's consumer, and connect the start-up and shutdown signals;
    returns the lost-message sweep, started once the worker consumes."""
    from producer.core.endings import Endings
    from worker.consumer import Intake, VlmqConsumer, tolerate_foreign_envelopes
    from worker.lifecycle import Finisher
    from worker.recovery import Recovery
    from worker.tasks import RefusalRecorder, RunJob, Services

    app, ledger = clients.celery, clients.ledger
    finisher = Finisher(Endings(clients.results, ledger, settings.webhook_secret, app.backend), pipeline.metrics)
    finisher.recorder = pipeline.pool  # a job's end recorded in a preprocessing process, off the engine's
    services = Services(pipeline, ledger, finisher, progressed=health.progressed)
    app.register_task(RunJob(services))
    intake = Intake(
        ledger,
        RefusalRecorder(services),
        max_bytes=settings.max_message_bytes,
        max_crashes=settings.max_crashes,
        max_eta_s=settings.visibility_timeout_s,
        hooks=pipeline.hooks,
        deadlines=services.deadlines,
        progressed=health.progressed,
    )
    app.conf.worker_consumer = VlmqConsumer.with_intake(intake)
    tolerate_foreign_envelopes()

    def send_again(job_id: str, payload: dict[str, Any], queue: str | None, force: bool) -> None:
        clients.publisher.publish([(job_id, payload)], queue or settings.queue, force)

    recovery = Recovery(
        ledger,
        send_again,
        settings.recover_interval_s,
        stored=clients.reader.peek,
        ended=lambda job, result: finisher.finish(result, job, write_s3=False),
    )
    waiting = _waiting_count(settings)

    def consuming() -> None:
        health.progressed()
        health.waiting = waiting
        health.reading_since = lambda: intake.busy_since

    worker_ready.connect(lambda **_: consuming(), weak=False)
    worker_ready.connect(lambda **_: pipeline.metrics.ready.set(1), weak=False)
    worker_shutting_down.connect(lambda **_: pipeline.metrics.ready.set(0), weak=False)
    return _chores(settings, ledger, recovery, pipeline.engine.name)


def _chores(settings: WorkerSettings, ledger: Ledger, recovery: Recovery, model: str) -> Periodic:
    """The worker's background chores, started once it consumes; returns the lost-message sweep."""
    from worker.consumer import HELD
    from worker.visibility import VisibilityHeartbeat, beat_every_s

    sweeping = Periodic("vlmq-recovery", settings.recover_interval_s, recovery.sweep_if_mine, "look for lost jobs")
    worker_ready.connect(lambda **_: sweeping.start(), weak=False)
    # Only a dead or frozen worker's messages come back after the visibility timeout, not a busy one's (until the
    # process exits: a warm shutdown still finishes its jobs).
    HELD.client = ledger.redis
    heartbeat = VisibilityHeartbeat(ledger.redis, HELD.tags)
    beat_every = beat_every_s(settings.visibility_timeout_s)
    beating = Periodic("vlmq-visibility", beat_every, heartbeat.beat, "re-arm the held messages' visibility")
    worker_ready.connect(lambda **_: beating.start(), weak=False)
    # /v1/models lists what the running workers serve
    announcing = Periodic(
        "vlmq-announce",
        ANNOUNCE_EVERY_S,
        lambda: announce(ledger.redis, ledger.keys, model),
        "announce the model",
        at_once=True,
    )
    worker_ready.connect(lambda **_: announcing.start(), weak=False)
    worker_shutting_down.connect(lambda **_: announcing.stop(), weak=False)
    return sweeping


def _waiting_count(settings: WorkerSettings) -> Callable[[], int]:
    """How many messages wait for this worker: queued in its queues, or held by it and not started (liveness)."""
    lists = [name for queue in settings.queues for name in queue_lists(queue)]
    probe_redis = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)

    def waiting() -> int:
        pipe = probe_redis.pipeline(transaction=False)
        for name in lists:
            pipe.llen(name)
        return sum(pipe.execute()) + len(worker_state.reserved_requests - worker_state.active_requests)

    return waiting


def _worker_argv(settings: WorkerSettings, worker_name: str, in_flight: int) -> list[str]:
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={in_flight}",
        f"--queues={','.join(settings.queues)}",  # in the order they are served
        "--loglevel=INFO",
        f"--hostname=vlmq-{worker_name.replace(':', '-')}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
