"""What vlmq reads directly from kombu's Redis layout: queue lists, messages in them, and queue statistics.

kombu keeps a queue as one Redis list per priority step (`<queue>`, `<queue>\\x06\\x16<step>`), pushes on the left
and pops on the right; a message is JSON whose `headers.id` is the task id and whose base64 `body` is Celery's
`[args, kwargs, embed]`. Only reads: kombu stays the only writer.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from producer.core.keys import Keys

_PRIORITY_STEPS = (0, 3, 6, 9)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists holding a queue's messages, one per kombu priority step."""
    return [queue if step == 0 else f"{queue}\x06\x16{step}" for step in _PRIORITY_STEPS]


def _message(raw: bytes | str) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # kombu's unacknowledged hash: [message, exchange, routing key]
            message = message[0]
        return message if isinstance(message, dict) else None
    except ValueError:
        return None


def message_id(raw: bytes | str) -> str | None:
    """The task id of a kombu message as stored in a queue list (or in kombu's unacknowledged hash)."""
    message = _message(raw)
    try:
        return str(message["headers"]["id"]) if message else None
    except (KeyError, TypeError):
        return None


def message_job(raw: bytes | str) -> dict[str, Any] | None:
    """The job JSON a `vlmq.run` message carries, or None for anything else."""
    message = _message(raw)
    try:
        if message is None or message["properties"].get("body_encoding") != "base64":
            return None
        args = json.loads(base64.b64decode(message["body"]))[0]
        return args[0] if args and isinstance(args[0], dict) else None
    except (KeyError, TypeError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class QueueStats:
    """A queue's backlog: messages waiting, age of the next one, jobs sent and not finished."""

    queue: str
    length: int
    oldest_seconds: float
    pending: int


def queue_stats(client: redis.Redis, queue: str, now: float | None = None, keys: Keys | None = None) -> QueueStats:
    """`queue`'s backlog; its pending jobs are read from `keys`' namespace (default: `vlmq`)."""
    lists = queue_lists(queue)
    pipe = client.pipeline()
    for name in lists:
        pipe.llen(name)
    for name in lists:
        pipe.lindex(name, -1)
    pipe.zcard((keys or Keys()).for_queue(queue).pending())
    replies = pipe.execute()
    lengths, heads, pending = replies[: len(lists)], replies[len(lists) : -1], replies[-1]
    now = time.time() if now is None else now
    oldest = 0.0
    for raw in heads:
        job = message_job(raw) if raw is not None else None
        if job and job.get("submitted_at"):
            oldest = max(oldest, now - datetime.fromisoformat(job["submitted_at"]).timestamp())
    return QueueStats(queue=queue, length=sum(lengths), oldest_seconds=max(0.0, oldest), pending=int(pending))


class QueueCollector(Collector):
    """Prometheus collector reading the queues' statistics from Redis at each scrape."""

    def __init__(self, client: redis.Redis, queues: Sequence[str], keys: Keys | None = None) -> None:
        self.client = client
        self.queues = list(queues)
        self.keys = keys

    def collect(self) -> Iterator[GaugeMetricFamily]:
        length = GaugeMetricFamily("vlmq_queue_length", "Messages waiting in the queue", labels=["queue"])
        oldest = GaugeMetricFamily(
            "vlmq_queue_oldest_seconds", "Age of the next message to be taken (since submitted_at)", labels=["queue"]
        )
        pending = GaugeMetricFamily(
            "vlmq_jobs_pending", "Jobs sent and not finished (queued, running or retrying)", labels=["queue"]
        )
        for queue in self.queues:
            stats = queue_stats(self.client, queue, keys=self.keys)
            length.add_metric([queue], stats.length)
            oldest.add_metric([queue], stats.oldest_seconds)
            pending.add_metric([queue], stats.pending)
        yield from (length, oldest, pending)
