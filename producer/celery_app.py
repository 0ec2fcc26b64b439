"""A Celery app for Celery's own tools, configured from the `VLMQ_*` environment like producers and workers.

    celery -A producer.celery_app inspect active        # also: reserved, stats, ping, active_queues
    celery -A producer.celery_app events                # needs task events on the workers (VLMQ_TASK_EVENTS)
    celery -A producer.celery_app flower --basic-auth=user:password

Producer side: it imports neither torch nor the worker, so the tools run wherever `vlmq submit` does. The app is the
one `producer.Client` builds, so it speaks to the broker exactly as producers and workers do (the same Redis
transport options, the same serializers); nothing connects until a tool uses it.
"""

from __future__ import annotations

from celery import Celery

from producer.client import Client

app: Celery = Client.from_env().celery
