"""Per-job bookkeeping in Redis that Celery does not keep: deliveries, finished jobs, dead letters, pending jobs.

Its keys, and what each holds, are listed in `producer/core/keys.py`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from producer.core.jobs import JobResult
from producer.core.keys import Keys
from producer.core.settings import SharedSettings

log = logging.getLogger(__name__)

MAX_DEAD_LETTERS = 100_000

# KEYS: seq counter, pending zset, payloads hash. ARGV: job id, payload (when sent), 1 = sent / 0 = requeued.
# A requeued job that is no longer pending (it finished meanwhile) is left alone.
_SEQUENCE = """
if ARGV[3] == '0' and not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
if ARGV[3] == '1' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) end
return seq
"""


@dataclass(frozen=True)
class DeadLetter:
    """A job that ended failed after exhausting its retries or crashing workers, or a message with no usable id
    (`message` holds a bounded copy of it; `job` is empty)."""

    job: dict[str, Any]
    result: JobResult
    message: dict[str, Any] | None = None


class Ledger:
    """The per-job and per-queue keys of `producer/core/keys.py`, on the broker's Redis."""

    def __init__(self, settings: SharedSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = client or redis.Redis.from_url(settings.broker_url, socket_timeout=10)
        self.keys = Keys.of(settings)
        self.dead_key = self.keys.dead_letters()
        self.pending_key = self.keys.pending()
        self.payloads_key = self.keys.payloads()
        self._sequence = self.redis.register_script(_SEQUENCE)

    def record_sent(self, jobs: Sequence[tuple[str, dict[str, Any]]], queue: str, force: bool = False) -> None:
        """Record jobs about to be pushed to `queue`, in one round trip (raises if Redis is down: the push would
        fail too)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, job in jobs:
            entry = json.dumps({"job": job, "queue": queue, "force": force})
            self._sequence(keys=self._sequence_keys, args=[job_id, entry, 1], client=pipe)
        pipe.execute()

    def known_many(self, job_ids: list[str]) -> list[str | None]:
        """For each job: "succeeded" (its result is stored), "pending" (sent and not finished), or None."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self.keys.done(job_id))
            pipe.zscore(self.pending_key, job_id)
        replies = pipe.execute()
        return [
            "succeeded" if done else "pending" if pending is not None else None
            for done, pending in zip(replies[::2], replies[1::2], strict=True)
        ]

    def claim(self, job_ids: Sequence[str], ttl_s: int = 60) -> list[str | None]:
        """Claim sending jobs, in one round trip: for each, None when this caller may send it, else "succeeded"
        (its result is stored), "pending" (sent and not finished) or "claimed" (another caller, or an earlier
        copy of the id in `job_ids`, is sending it now). Release the claims with `release` once sent."""
        pipe = self.redis.pipeline()
        for job_id in job_ids:
            pipe.exists(self.keys.done(job_id))
            pipe.zscore(self.pending_key, job_id)
            pipe.set(self.keys.claim(job_id), 1, nx=True, ex=ttl_s)
        replies = pipe.execute()
        states: list[str | None] = []
        for done, pending, claimed in zip(replies[::3], replies[1::3], replies[2::3], strict=True):
            states.append("succeeded" if done else "pending" if pending is not None else None if claimed else "claimed")
        return states

    def release(self, job_ids: Sequence[str]) -> None:
        """Drop claims taken with `claim` (the jobs' pending entries guard them once they are sent)."""
        if job_ids:
            self.redis.delete(*(self.keys.claim(job_id) for job_id in job_ids))

    def record_requeued(self, job_id: str) -> None:
        """The job's message is pushed again (a retry): it takes its new place in the queue's order."""
        try:
            self._sequence(keys=self._sequence_keys, args=[job_id, "", 0])
        except redis.RedisError as exc:
            log.warning("job %s: could not record its retry in Redis (%s)", job_id, exc)

    @property
    def _sequence_keys(self) -> list[str]:
        return [self.keys.seq(), self.pending_key, self.payloads_key]

    def record_taken(self, job_id: str) -> int:
        """A redelivered message reached a task thread: it is not what kills consumers (its receipts are
        forgotten). Returns the job's starts counted so far in its current run (0 when unknown or Redis cannot be
        reached)."""
        try:
            pipe = self.redis.pipeline()
            pipe.get(self.keys.deliveries(job_id))
            pipe.delete(self.keys.receipts(job_id))
            return int(pipe.execute()[0] or 0)
        except redis.RedisError:
            return 0

    def record_started(self, job_id: str, retries: int) -> tuple[int, bool]:
        """Count one more start of the job; returns (starts in this run, whether it already succeeded).

        If Redis cannot be reached the job runs as if nothing were known (a later copy may then run twice).
        """
        key = self.keys.deliveries(job_id)
        try:
            pipe = self.redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, self.settings.result_expires_s)
            pipe.exists(self.keys.done(job_id))
            starts, _, done = pipe.execute()
        except redis.RedisError as exc:
            log.warning("job %s: could not count its start in Redis (%s); running it", job_id, exc)
            return retries + 1, False
        return int(starts), bool(done)

    def record_received_again(self, job_id: str) -> int:
        """Count a redelivered receipt of the job's message; returns the count since the job last started (0 when
        Redis cannot be reached)."""
        key = self.keys.receipts(job_id)
        try:
            pipe = self.redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, self.settings.result_expires_s)
            return int(pipe.execute()[0])
        except redis.RedisError as exc:
            log.warning("job %s: could not count its redelivery in Redis (%s)", job_id, exc)
            return 0

    def first_seen(self, job_id: str, now: datetime) -> datetime:
        """When a worker first saw the job (`now`, the first time it is asked; `now` when Redis cannot be reached)."""
        key = self.keys.seen(job_id)
        try:
            pipe = self.redis.pipeline()
            pipe.set(key, now.isoformat(), nx=True, ex=self.settings.result_expires_s)
            pipe.get(key)
            seen = pipe.execute()[1]
        except redis.RedisError as exc:
            log.warning("job %s: could not read when it was first seen (%s)", job_id, exc)
            return now
        return datetime.fromisoformat(seen.decode()) if seen else now

    def has_succeeded(self, job_id: str) -> bool:
        """Whether the job is known to have succeeded (False when Redis cannot be reached)."""
        try:
            return bool(self.redis.exists(self.keys.done(job_id)))
        except redis.RedisError:
            return False

    def record_finished(self, result: JobResult) -> None:
        """The job has its terminal result: forget its starts; remember a success."""
        try:
            pipe = self.redis.pipeline()
            pipe.delete(self.keys.deliveries(result.id), self.keys.receipts(result.id), self.keys.seen(result.id))
            pipe.zrem(self.pending_key, result.id)
            pipe.hdel(self.payloads_key, result.id)
            if result.ok:
                pipe.set(self.keys.done(result.id), 1, ex=self.settings.result_expires_s)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("job %s: could not record its end in Redis (%s)", result.id, exc)

    def dead_letter(self, job: dict[str, Any], result: JobResult) -> None:
        """Record a failed job in the queue's dead letters (its result is stored in any case)."""
        payload = json.dumps({"job": job, "result": result.model_dump(mode="json")})
        try:
            self.redis.hset(self.dead_key, result.id, payload)
        except redis.RedisError as exc:
            log.error("job %s: could not add it to %s (%s); its failed result is stored", result.id, self.dead_key, exc)

    def dead_letter_message(self, message: dict[str, Any], result: JobResult) -> bool:
        """Keep a message that has no usable task id (`result.id` is `message:<uuid>`) in the dead letters, while
        they hold fewer than MAX_DEAD_LETTERS entries (a flood of junk must not fill Redis). Returns whether kept."""
        if self.redis.hlen(self.dead_key) >= MAX_DEAD_LETTERS:
            return False
        payload = json.dumps({"job": {}, "message": message, "result": result.model_dump(mode="json")})
        self.redis.hset(self.dead_key, result.id, payload)
        return True

    def dead_letters(self) -> list[DeadLetter]:
        """The queue's dead letters, oldest failure first."""
        letters = []
        for raw in self.redis.hvals(self.dead_key):
            entry = json.loads(raw)
            result = JobResult.model_validate(entry["result"])
            letters.append(DeadLetter(job=entry["job"], result=result, message=entry.get("message")))
        return sorted(letters, key=lambda d: d.result.finished_at)

    def forget(self, job_id: str) -> None:
        """Drop everything kept about a job, before it runs again from the start."""
        pipe = self.redis.pipeline()
        pipe.hdel(self.dead_key, job_id)
        pipe.zrem(self.pending_key, job_id)
        pipe.hdel(self.payloads_key, job_id)
        pipe.delete(*self.keys.per_job(job_id))
        pipe.execute()
