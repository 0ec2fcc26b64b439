"""Send again the jobs whose message Redis lost: the reconciliation that kombu's Redis transport lacks.

kombu pops a message off the queue (BRPOP) and only then records it as unacknowledged. A worker killed between
the two, or one whose reply from Redis was still unread in its socket, takes the message with it: the job never
runs and never fails (kombu#305, kombu#1733). The ledger (`producer/core/ledger.py`) keeps every sent, unfinished job
with a sequence number taken just before its message was pushed, so "pushed before the message now at the head
of the queue" means "already popped". Such a job whose message is neither unacknowledged (held by a live worker)
nor back in a queue list, on two sweeps at least `recover_interval_s` apart, was lost: it is sent again under its
own id. Sending twice is harmless where it could happen (the stored S3 result is returned), losing is not.

Every time stored or compared comes from Redis (`TIME`), not the sweeping host: sweeps run on whichever worker
holds the lock, and a host whose clock runs ahead would otherwise confirm a job missing before a whole interval
has passed, sending again a message that was only slow to reach `unacked`.

One worker at a time sweeps (a Redis lock per queue). A sweep costs one read of the queue heads, of the pending
jobs popped so far and of the unacknowledged messages; only a confirmed-missing job makes it read whole queue
lists, to tell a message pushed back to the tail (`reject(requeue=True)`, warm shutdown) from a lost one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import redis

from producer.core.broker import message_id, queue_lists
from producer.core.jobs import JobResult
from producer.core.ledger import Ledger

log = logging.getLogger(__name__)

_UNACKED_KEY = "unacked"
_SCAN_CHUNK = 1000
_MOST_CANDIDATES = 10_000

Send = Callable[[str, dict[str, Any], str | None, bool], None]


class Recovery:
    """Finds lost jobs of one queue and sends them again."""

    def __init__(
        self,
        ledger: Ledger,
        send: Send,
        interval_s: float,
        clock: Callable[[], float] | None = None,
        stored: Callable[[str], JobResult | None] = lambda job_id: None,
        ended: Callable[[dict[str, Any], JobResult], None] = lambda job, result: None,
    ) -> None:
        self.ledger = ledger
        self.stored = stored  # the job's result if one was stored (its end was not recorded: Redis was down)
        self.ended = ended  # records such a job's end (the lifecycle's `stored` ending: ledger and batch count)
        self.redis: redis.Redis = ledger.redis
        self.send = send
        self.interval_s = interval_s
        self.clock = clock or self._redis_time  # tests pass their own to step time
        self.lists = [name for q in ledger.settings.queues for name in queue_lists(q)]
        self.missing_key = ledger.keys.missing()
        self.lock_key = ledger.keys.recover_lock()

    def sweep_if_mine(self) -> None:
        """Sweep, unless another worker of the queue did this interval (one sweep per interval across all of them;
        the lock expires rather than being freed). `vlmq worker` calls it every `interval_s`."""
        if self.redis.set(self.lock_key, 1, nx=True, px=int(self.interval_s * 1000 * 0.9)):
            self.sweep()

    def sweep(self) -> list[str]:
        """One pass; returns the ids of the jobs sent again."""
        candidates = self._popped()
        if not candidates:
            self.redis.delete(self.missing_key)
            return []
        held = set(filter(None, map(message_id, self.redis.hvals(_UNACKED_KEY))))
        missing = [job_id for job_id in candidates if job_id not in held]
        confirmed = self._confirm(missing)
        if not confirmed:
            return []
        queued = set(self._queued_ids())
        resent = []
        for job_id in confirmed:
            if job_id in queued:  # pushed back to the tail: it takes the place it now has in the order
                self.ledger.record_requeued(job_id)
                continue
            raw = self.redis.hget(self.ledger.payloads_key, job_id)
            if raw is None:  # finished meanwhile
                continue
            entry = json.loads(raw)
            result = self.stored(job_id)
            if result is not None:  # it finished, but Redis was down when it recorded that
                self.ended(entry["job"], result)
                continue
            log.warning("job %s: its message was lost (a worker died receiving it); sending it again", job_id)
            self.send(job_id, entry["job"], entry.get("queue"), bool(entry.get("force")))
            resent.append(job_id)
        self.redis.hdel(self.missing_key, *confirmed)
        return resent

    def _popped(self) -> list[str]:
        """Pending jobs pushed before the message at the head of their queue's lists: they were popped since.

        Each queue has its own cut-off, so a lost interactive job is found while the bulk queue holds a backlog.
        """
        bounds = {queue: self._bound(queue) for queue in self.ledger.settings.queues}
        highest = max(bounds.values())
        if highest == float("-inf"):
            return []
        upper = "+inf" if highest == float("inf") else f"({highest}"
        scored: Any = self.redis.zrangebyscore(
            self.ledger.pending_key, "-inf", upper, 0, _MOST_CANDIDATES, withscores=True
        )
        ids: list[tuple[str, float]] = [(i.decode() if isinstance(i, bytes) else str(i), float(n)) for i, n in scored]
        entries = self.redis.hmget(self.ledger.payloads_key, [i for i, _ in ids]) if ids else []
        lowest = min(bounds.values())
        popped = []
        for (job_id, score), raw in zip(ids, entries, strict=True):
            queue = str(json.loads(raw).get("queue")) if raw else ""
            if score < bounds.get(queue, lowest):
                popped.append(job_id)
        return popped

    def _bound(self, queue: str) -> float:
        """The sequence number of the next message of `queue` (-inf: unknown, so nothing; +inf: queue empty)."""
        pipe = self.redis.pipeline()
        for name in queue_lists(queue):
            pipe.lindex(name, -1)
        heads = [message_id(raw) for raw in pipe.execute() if raw is not None]
        if not heads:
            return float("inf")
        pipe = self.redis.pipeline()
        for job_id in heads:
            pipe.zscore(self.ledger.pending_key, job_id or "")
        scores = pipe.execute()
        if any(score is None for score in scores):  # a message vlmq did not send (or already finished): wait
            return float("-inf")
        return float(min(scores))

    def _confirm(self, missing: list[str]) -> list[str]:
        """Of the jobs missing now, those also missing at an earlier sweep at least one interval ago."""
        now = self.clock()
        seen: dict[str, float] = {}
        for key, value in self.redis.hgetall(self.missing_key).items():
            seen[key.decode() if isinstance(key, bytes) else key] = float(value)
        gone = [job_id for job_id in seen if job_id not in missing]
        pipe = self.redis.pipeline()
        if gone:
            pipe.hdel(self.missing_key, *gone)
        for job_id in missing:
            if job_id not in seen:
                pipe.hset(self.missing_key, job_id, now)
        pipe.execute()
        return [job_id for job_id in missing if job_id in seen and now - seen[job_id] >= self.interval_s]

    def _redis_time(self) -> float:
        """Seconds since the epoch by the Redis server's clock: the one clock every worker host shares."""
        seconds, microseconds = self.redis.time()
        return seconds + microseconds / 1_000_000

    def _queued_ids(self) -> Iterator[str]:
        for name in self.lists:
            start = 0
            while page := self.redis.lrange(name, start, start + _SCAN_CHUNK - 1):  # to the end, even if it grew
                yield from filter(None, map(message_id, page))
                start += _SCAN_CHUNK
