"""The worker's Celery app: the only module that configures Celery, and the entry point of `vlmq worker`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down
from celery.worker.consumer import Consumer
from kombu.message import Message

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
    )
    return app


def consumer_class(refused: Callable[[Message, Exception], None]) -> type[Consumer]:
    """Celery's consumer, but a task message it cannot decode is also handed to `refused` (after Celery's own
    handling: logged, and removed from the queue), and a broken broker connection that fails to close does not
    stop the worker."""

    class VlmqConsumer(Consumer):
        def on_connection_error_after_connected(self, exc: Exception) -> None:
            try:
                super().on_connection_error_after_connected(exc)
            except AttributeError as error:
                # kombu 5.7 race, seen once in ~15 Redis restarts: closing the lost channel restores its unacked
                # messages through a client it has already dropped ("'NoneType' object has no attribute
                # 'hostname'"). Celery would call that unrecoverable and stop the worker with status 0. The
                # messages stay in the unacknowledged hash and come back after the visibility timeout.
                log.warning("closing the lost broker connection failed (%s); reconnecting anyway", error)

        def on_decode_error(self, message: Message, exc: Exception) -> None:  # body is not valid JSON
            super().on_decode_error(message, exc)
            refused(message, exc)

        def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:  # e.g. a pickle message
            super().on_invalid_task(body, message, exc)
            refused(message, exc)

    return VlmqConsumer


def run_worker(settings: WorkerSettings) -> None:
    """Load the model, then consume jobs until stopped (SIGTERM/SIGINT: warm shutdown)."""
    from producer.batch import BatchStore
    from producer.client import Client
    from worker.engine import Engine
    from worker.health import Health
    from worker.metrics import Metrics
    from worker.recovery import Recovery
    from worker.tasks import count_in_batch, refused_message_handler, register_tasks
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
    engine = Engine.start(settings, metrics)
    health.batch_age = engine.watchdog.age
    health.probe = engine.model.probe
    app = create_app(settings)
    ledger = Ledger(settings)
    register_tasks(app, engine, ledger)
    app.conf.worker_consumer = consumer_class(refused_message_handler(app, engine, ledger))
    producer, batches = Client(settings), BatchStore(ledger.redis)
    recovery = Recovery(
        ledger,
        producer.send_json,
        settings.recover_interval_s,
        stored=producer.peek,
        ended=lambda job, result: count_in_batch(batches, settings.webhook_secret, job, result),
    )
    worker_ready.connect(lambda **_: engine.metrics.ready.set(1), weak=False)
    worker_ready.connect(lambda **_: recovery.start(), weak=False)
    worker_shutting_down.connect(lambda **_: engine.metrics.ready.set(0), weak=False)
    log.info(
        "worker %s loaded model %s, max batch %d, max wait %.0f ms, %d jobs in flight, queues %s",
        engine.worker_name,
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
        f"--hostname=vlmq-{engine.worker_name.replace(':', '-')}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    try:
        app.worker_main(argv)
    finally:
        recovery.stop()
        engine.close()
        if engine.restart_requested:  # a warm shutdown asked for by the worker itself: not a clean stop
            raise SystemExit(EXIT_RESTART)
