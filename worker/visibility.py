"""Keep the messages a live worker holds from being delivered again: the visibility heartbeat.

kombu's Redis transport emulates acknowledgements: a delivered message is written to `unacked` with its delivery
time in `unacked_index`, and any worker's sweep puts back in its queue every message delivered more than
`visibility_timeout` ago. That brings back a dead worker's jobs, and also those of a live worker that holds one
longer: a job waiting behind a backlog in its worker, a long video batch, a retry waiting out its delay while S3 is
down. Its second copy then runs on another worker while the first still runs (celery#5935).

The heartbeat re-arms, every quarter of the visibility timeout, the delivery time of each message this worker
process holds and has not acknowledged, so that only a worker that stopped beating (killed, or frozen) has its
messages redelivered, a visibility timeout after its last beat. `ZADD XX` only updates: a message acknowledged or
restored meanwhile is not put back in the index.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable

import redis

UNACKED_INDEX = "unacked_index"  # kombu's default `unacked_index_key`
UNACKED = "unacked"  # kombu's default `unacked_key`: delivery tag -> the message
MOST_EVERY_S = 30.0


def beat_every_s(visibility_timeout_s: float) -> float:
    """A quarter of the visibility timeout (at most 30 s): a held message is never older than that plus one beat."""
    return max(0.5, min(MOST_EVERY_S, visibility_timeout_s / 4))


class HeldMessages:
    """The delivery tags of the messages this process's broker channels hold unacknowledged (kombu's QoS state)."""

    def __init__(self) -> None:
        self._channels: weakref.WeakSet[object] = weakref.WeakSet()
        self.client: redis.Redis | None = None  # the worker's, for what a lost channel cannot acknowledge

    def acknowledge(self, tag: str) -> bool:
        """Take a message out of kombu's unacknowledged set, as its channel's ack would, for a channel whose
        connection was lost; False when this process has no client for it (it then comes back after the visibility
        timeout, and its copy returns the stored result)."""
        if self.client is None:
            return False
        pipe = self.client.pipeline()
        pipe.zrem(UNACKED_INDEX, tag)
        pipe.hdel(UNACKED, tag)
        pipe.execute()
        return True

    def track(self, channel: object) -> None:
        self._channels.add(channel)

    def tags(self) -> list[str]:
        held: list[str] = []
        for channel in list(self._channels):
            qos = getattr(channel, "_qos", None)  # created with the channel's first consumer
            if qos is None:
                continue
            for _ in range(3):  # another thread may change them while they are copied: copy again
                try:
                    delivered, acked = list(qos._delivered), set(qos._dirty)
                    break
                except RuntimeError:
                    continue
            else:
                continue
            held.extend(str(tag) for tag in delivered if tag not in acked)
        return held


class VisibilityHeartbeat:
    """Re-arms the delivery time of the messages a worker holds; `vlmq worker` beats every `beat_every_s`."""

    def __init__(self, client: redis.Redis, held: Callable[[], Iterable[str]], clock: Callable[[], float] = time.time):
        self.client, self.held, self.clock = client, held, clock

    def beat(self) -> int:
        """Re-arm every held message once; returns how many were held. kombu stamps deliveries with the local
        clock (`time()`), and so does the heartbeat."""
        tags = list(self.held())
        if tags:
            now = self.clock()
            self.client.zadd(UNACKED_INDEX, dict.fromkeys(tags, now), xx=True)
        return len(tags)
