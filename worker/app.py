"""The worker's Celery app: the only module that configures Celery, and the entry point of `vlmq worker`."""

from __future__ import annotations

import logging

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutting_down
from celery.worker import state as worker_state

from producer.broker import queue_lists
from producer.celery_config import celery_config
from producer.ledger import Ledger
from worker.settings import WorkerSettings

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


def run_worker(settings: WorkerSettings) -> None:
    """Load the model, then consume jobs until stopped (SIGTERM/SIGINT: warm shutdown)."""
    from producer.client import Client
    from worker.consumer import Intake, consumer_class, tolerate_unreadable_envelopes
    from worker.gate import Deadlines
    from worker.health import Health
    from worker.lifecycle import Finisher
    from worker.metrics import Metrics
    from worker.pipeline import Pipeline
    from worker.recovery import Recovery
    from worker.tasks import refusal_recorder, register_tasks
    from worker.watchdog import EXIT_RESTART

    if not settings.results_bucket:
        log.warning(
            "VLMQ_RESULTS_BUCKET is not set: results go to Redis only, and expire after %d s", settings.result_expires_s
        )
    metrics = Metrics()
    health = Health(metrics, settings.liveness_stall_s)
    if settings.metrics_port:
        health.serve(settings.metrics_port)
        log.info("metrics and probes on :%d (/metrics, /livez, /readyz)", settings.metrics_port)
    pipeline = Pipeline.start(settings, metrics)
    health.batch_age = pipeline.engine.busy_for
    health.probe = pipeline.engine.probe
    app = create_app(settings)
    ledger = Ledger(settings)
    deadlines = Deadlines()
    finisher = Finisher(pipeline.results, ledger, pipeline.metrics, settings.webhook_secret, app.backend)
    register_tasks(app, pipeline, ledger, finisher, deadlines, health.progressed)
    intake = Intake(
        ledger,
        refusal_recorder(pipeline, ledger, finisher),
        max_bytes=settings.max_message_bytes,
        max_crashes=settings.max_crashes,
        faults=pipeline.faults,
        deadlines=deadlines,
        progressed=health.progressed,
    )
    app.conf.worker_consumer = consumer_class(intake)
    tolerate_unreadable_envelopes()
    producer = Client(settings)
    recovery = Recovery(
        ledger,
        producer.send_json,
        settings.recover_interval_s,
        stored=producer.peek,
        ended=lambda job, result: finisher.finish(result, job, "stored"),
    )
    lists = [name for queue in settings.queues for name in queue_lists(queue)]
    # Its own client, with short timeouts: a slow Redis must not make the probe itself time out (a restart would
    # not help; the consumer reconnects by itself).
    probe_redis = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)

    def waiting() -> int:  # queued for this worker, or held by it and not started
        pipe = probe_redis.pipeline(transaction=False)
        for name in lists:
            pipe.llen(name)
        return sum(pipe.execute()) + len(worker_state.reserved_requests - worker_state.active_requests)

    def consuming() -> None:
        health.progressed()
        health.waiting = waiting
        health.reading_since = lambda: intake.busy_since

    worker_ready.connect(lambda **_: consuming(), weak=False)
    worker_ready.connect(lambda **_: pipeline.metrics.ready.set(1), weak=False)
    worker_ready.connect(lambda **_: recovery.start(), weak=False)
    worker_shutting_down.connect(lambda **_: pipeline.metrics.ready.set(0), weak=False)
    log.info(
        "worker %s loaded model %s, max batch %d, max wait %.0f ms, %d jobs in flight, queues %s",
        pipeline.worker_name,
        settings.model,
        settings.max_batch_size,
        settings.max_wait_ms,
        settings.in_flight,
        " then ".join(settings.queues),
    )
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.in_flight}",
        f"--queues={','.join(settings.queues)}",  # in the order they are served
        "--loglevel=INFO",
        f"--hostname=vlmq-{pipeline.worker_name.replace(':', '-')}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    try:
        app.worker_main(argv)
    finally:
        recovery.stop()
        pipeline.close()
        if pipeline.restart_requested:  # a warm shutdown asked for by the worker itself: not a clean stop
            raise SystemExit(EXIT_RESTART)
