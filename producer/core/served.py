"""Which models the running workers serve, as `vlmq api` lists them on /v1/models.

Each worker announces its model (`VLMQ_MODEL`, as its results name it) in `<namespace>:models`, a sorted set of
model -> the time the announcement expires, every `ANNOUNCE_EVERY_S`; an announcement lasts `ANNOUNCEMENT_TTL_S`,
so a model drops out of the list a minute after its last worker stopped.
"""

from __future__ import annotations

import time

import redis

from producer.core.keys import Keys

ANNOUNCE_EVERY_S = 15.0
ANNOUNCEMENT_TTL_S = 60.0


def announce(client: redis.Redis, keys: Keys, model: str, now: float | None = None) -> None:
    """Say that a running worker serves `model` (for the next `ANNOUNCEMENT_TTL_S`)."""
    now = time.time() if now is None else now
    pipe = client.pipeline()
    pipe.zadd(keys.models(), {model: now + ANNOUNCEMENT_TTL_S})
    pipe.zremrangebyscore(keys.models(), "-inf", now)
    pipe.expire(keys.models(), int(ANNOUNCEMENT_TTL_S))
    pipe.execute()


def served_models(client: redis.Redis, keys: Keys, now: float | None = None) -> list[str]:
    """The models running workers announced, sorted by name."""
    now = time.time() if now is None else now
    return sorted(
        m.decode() if isinstance(m, bytes) else str(m) for m in client.zrangebyscore(keys.models(), now, "+inf")
    )
