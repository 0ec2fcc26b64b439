"""Named batches: counts kept in Redis as jobs start and finish, honest status, results assembled as JSONL.

This module is the Redis side, which producers and workers share (`BatchStore`); `producer.batch.BatchHandle` is
what a producer holds.

Keys (all on the broker's Redis; the layout is in `producer/core/keys.py`, shown here with the default namespace):
- `vlmq:batch:<name>`: hash of the batch's fields (`total`, `submitted`, `created_at`, `ended_at`, `cancelled_at`,
  `webhook`) and one counter per job state (`running`, `succeeded`, `failed`, `cancelled`);
- `vlmq:batch:<name>:ids`: the job ids in input order (for results in input order);
- `vlmq:batch:<name>:state`: job id -> its state; a change moves one count from the old state to the new one, so
  a redelivered or re-run job is never counted twice;
- `vlmq:batch:<name>:failed`: job id -> job JSON of the failed ones, for `retry-failed`.

Workers update the counts; the worker that finishes a batch's last job sees its end exactly once (HSETNX) and
announces it: a POST of the status JSON to the batch's webhook, signed with HMAC-SHA256 over the body using
`VLMQ_WEBHOOK_SECRET` (header `X-Vlmq-Signature: sha256=<hex>`; `producer/core/webhook.py`), and a message on the
Redis channel `vlmq:batch-events`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import redis

from producer.core.keys import Keys
from producer.core.webhook import post_webhook

log = logging.getLogger(__name__)

JobState = Literal["running", "succeeded", "failed", "cancelled"]
BatchStatusName = Literal[
    "submitting", "running", "completed", "completed_with_failures", "failed", "cancelled", "unknown"
]

# KEYS: batch hash, state hash, failed hash. ARGV: job id, new state ("" = forget the job's state), job JSON (when
# failed), now. Returns 1 when this call ended the batch.
_MOVE = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
local new = ARGV[2]
if new == 'running' and old then return 0 end
if old ~= new and (old or new ~= '') then
  if old then redis.call('HINCRBY', KEYS[1], old, -1) end
  if new == '' then redis.call('HDEL', KEYS[2], ARGV[1]) else
    redis.call('HSET', KEYS[2], ARGV[1], new)
    redis.call('HINCRBY', KEYS[1], new, 1)
  end
end
if new == 'failed' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) else redis.call('HDEL', KEYS[3], ARGV[1]) end
if redis.call('HGET', KEYS[1], 'submitted') ~= '1' then return 0 end
local function n(f) return tonumber(redis.call('HGET', KEYS[1], f) or '0') end
if n('succeeded') + n('failed') + n('cancelled') >= n('total') then
  return redis.call('HSETNX', KEYS[1], 'ended_at', ARGV[4])
end
return 0
"""


@dataclass(frozen=True)
class BatchStatus:
    """A batch's counts and timing; `status` is derived from the counts, never stored."""

    name: str
    status: BatchStatusName
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    created_at: str | None
    ended_at: str | None

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class BatchStore:
    """The Redis side of named batches, shared by producers (submit, status, cancel) and workers (counts)."""

    def __init__(self, client: redis.Redis, keys: Keys | None = None) -> None:
        self.redis = client
        self.keys = keys or Keys()  # the default namespace unless given (callers pass `Ledger.keys`)
        self._move = client.register_script(_MOVE)

    def key(self, name: str, part: str = "") -> str:
        return self.keys.batch(name, part)

    def _keys(self, name: str) -> list[str]:
        return [self.key(name), self.key(name, "state"), self.key(name, "failed")]

    # -- producer side -------------------------------------------------------------------------------------------
    def begin(self, name: str, webhook: str | None) -> None:
        """Start (or restart) submitting: ids, states and counts are rebuilt from what is sent now.

        Jobs that already succeeded are counted again as they are skipped; jobs still queued from an earlier
        submission are counted when they end.
        """
        if webhook and not webhook.startswith(("https://", "http://")):
            raise ValueError(f"webhook {webhook!r}: give an https:// (or http://) URL")
        pipe = self.redis.pipeline()
        pipe.hsetnx(self.key(name), "created_at", _now())
        pipe.hset(self.key(name), mapping={"submitted": 0, "webhook": webhook or ""})
        pipe.hdel(self.key(name), "ended_at", "cancelled_at", "total", "running", "succeeded", "failed", "cancelled")
        pipe.delete(self.key(name, "ids"), self.key(name, "state"), self.key(name, "failed"))
        pipe.execute()

    def states(self, name: str, job_ids: list[str]) -> list[str | None]:
        return [None if s is None else _text(s) for s in self.redis.hmget(self.key(name, "state"), job_ids)]

    def add(self, name: str, job_ids: list[str], requeued: list[str], succeeded: list[str]) -> None:
        """Append ids in input order; `requeued` jobs (re-sent) lose their old state, `succeeded` (skipped) get one."""
        self.redis.rpush(self.key(name, "ids"), *job_ids)
        self._move_all(name, requeued, "")
        self._move_all(name, succeeded, "succeeded")

    def requeue(self, name: str, job_ids: list[str]) -> None:
        """Jobs of the batch sent again (retry-failed): they lose their state until they end again."""
        self.redis.hdel(self.key(name), "ended_at")
        self._move_all(name, job_ids, "")

    def _move_all(self, name: str, job_ids: list[str], state: str) -> None:
        """Give every job `state` ("" = none), in one round trip."""
        if not job_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            self._move(keys=self._keys(name), args=[job_id, state, "", _now()], client=pipe)
        pipe.execute()

    def close_submission(self, name: str) -> bool:
        """Submitting is over; returns True if every job had already ended (the batch ends now)."""
        total = self.redis.llen(self.key(name, "ids"))
        self.redis.hset(self.key(name), mapping={"total": total, "submitted": 1})
        return bool(self._move(keys=self._keys(name), args=["", "", "", _now()]))

    def cancel(self, name: str) -> None:
        self.redis.hsetnx(self.key(name), "cancelled_at", _now())

    def status(self, name: str) -> BatchStatus:
        fields = {_text(k): _text(v) for k, v in self.redis.hgetall(self.key(name)).items()}
        if not fields:
            return BatchStatus(name, "unknown", 0, 0, 0, 0, 0, 0, None, None)
        counts = {s: max(0, int(fields.get(s, 0))) for s in ("running", "succeeded", "failed", "cancelled")}
        submitted = fields.get("submitted") == "1"
        total = int(fields["total"]) if submitted else self.redis.llen(self.key(name, "ids"))
        done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
        status: BatchStatusName
        if not submitted:
            status = "submitting"
        elif done < total:
            status = "running"  # a cancelled batch too, until workers have ended its unstarted jobs `cancelled`
        elif counts["cancelled"]:
            status = "cancelled"
        elif counts["failed"] == total and total > 0:
            status = "failed"
        elif counts["failed"]:
            status = "completed_with_failures"
        else:
            status = "completed"
        return BatchStatus(
            name=name,
            status=status,
            total=total,
            queued=max(0, total - done - counts["running"]),
            created_at=fields.get("created_at"),
            ended_at=fields.get("ended_at"),
            **counts,
        )

    def ids(self, name: str, chunk: int = 1000) -> Iterator[list[str]]:
        """The batch's job ids in input order, `chunk` at a time."""
        key = self.key(name, "ids")
        for start in range(0, self.redis.llen(key), chunk):
            yield [_text(i) for i in self.redis.lrange(key, start, start + chunk - 1)]

    def failed_jobs(self, name: str) -> dict[str, dict[str, Any]]:
        return {_text(k): json.loads(v) for k, v in self.redis.hgetall(self.key(name, "failed")).items()}

    # -- worker side ---------------------------------------------------------------------------------------------
    def is_cancelled(self, name: str) -> bool:
        return bool(self.redis.hexists(self.key(name), "cancelled_at"))

    def record_started(self, name: str, job_id: str) -> None:
        self._move(keys=self._keys(name), args=[job_id, "running", "", _now()])

    def record_finished(self, name: str, job_id: str, state: JobState, job: dict[str, Any] | None = None) -> bool:
        """Count the job's end; returns True for the one call that ended the batch."""
        return bool(self._move(keys=self._keys(name), args=[job_id, state, json.dumps(job or {}), _now()]))

    def announce(self, name: str, secret: str | None) -> threading.Thread | None:
        """Tell `<namespace>:batch-events` subscribers and the batch's webhook (if any, from a thread) that it ended."""
        status = self.status(name)
        body = json.dumps({"event": "batch.ended", "batch": status.to_json()}).encode()
        self.redis.publish(self.keys.batch_events(), body)
        log.info("batch %s ended: %s, %d of %d succeeded", name, status.status, status.succeeded, status.total)
        url = _text(self.redis.hget(self.key(name), "webhook") or b"")
        if not url:
            return None
        thread = threading.Thread(target=post_webhook, args=(url, body, secret), name="vlmq-webhook", daemon=True)
        thread.start()
        return thread
