"""The Celery settings that producers and workers must agree on (serialization, routing, Redis timeouts)."""

from __future__ import annotations

from typing import Any

from producer.core.settings import SharedSettings


def celery_config(settings: SharedSettings) -> dict[str, Any]:
    """Celery configuration shared by `producer.Client` and the worker app.

    JSON only: a message is data, never code, so a pickle message sent to the broker is refused, not run.
    """
    # Redis redelivers a message that stays unacknowledged past visibility_timeout while its first copy still runs
    # (celery#5935); the same timeout must be given to the result backend's transport too.
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    # Workers pop from their queues in the order given (interactive first), not round-robin: a backfill in the
    # bulk queue never delays a single job by more than the batches already running.
    order = {"queue_order_strategy": "priority"}
    # Messages of a worker that died come back once they are older than visibility_timeout and a worker sweeps for
    # them. kombu sweeps every unacked_restore_interval x unacked_restore_throttle seconds (10 x 10 by default):
    # sweep every interval instead, and at a tenth of the timeout when that is shorter.
    restore = {
        "unacked_restore_throttle": 1,
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 10)),
        # The sweep holds a Redis lock; a worker killed while holding it would stop every sweep for 5 minutes.
        "unacked_mutex_expire": 30,
    }
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": settings.queue,
        "result_expires": settings.result_expires_s,
        "broker_transport_options": {**transport, **restore, **order},
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_track_started": True,
    }
