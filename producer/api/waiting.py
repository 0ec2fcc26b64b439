"""A job's state and result as the API reports them, and long-polling for a result without holding a thread.

Where a job's state comes from, in this order (each is right when the ones before it say nothing):
1. Celery's result meta in Redis: the result once it ends (`STARTED` while a worker runs it);
2. the ledger's pending jobs: sent and not finished, so `queued` (or `running` once a worker counted a start);
3. the S3 result object: the result after Redis let it expire;
4. none of these: the id is unknown.
Reading Redis before S3 keeps a failed job that is submitted again from showing its old result while it reruns.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from producer.client import Client
from producer.jobs import JobResult
from producer.results import READY_STATES, from_celery

POLL_S = 0.05

State = Literal["queued", "running", "succeeded", "failed", "unknown"]


@dataclass(frozen=True)
class Seen:
    """A job's state now, and its result once it has one."""

    state: State
    result: JobResult | None = None


def _ended(result: JobResult) -> Seen:
    return Seen("succeeded" if result.ok else "failed", result)


class Waiter:
    """Reads job states with asyncio Redis clients (one on the result backend, one on the broker's Redis)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.backend: Any = client.celery.backend
        self.results = aioredis.Redis.from_url(client.settings.backend_url)
        self.broker = aioredis.Redis.from_url(client.settings.broker_url)

    async def close(self) -> None:
        await self.results.aclose()
        await self.broker.aclose()

    async def _meta(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.results.get(self.backend.get_key_for_task(job_id))
        return None if raw is None else dict(self.backend.decode_result(raw))

    async def state(self, job_id: str) -> Seen:
        meta = await self._meta(job_id)
        if meta is not None and meta.get("status") in READY_STATES:
            return _ended(from_celery(job_id, meta["status"], meta["result"]))
        keys = self.client.ledger.keys
        pipe = self.broker.pipeline(transaction=False)
        pipe.zscore(keys.pending(), job_id)
        pipe.get(keys.deliveries(job_id))
        pending, starts = await pipe.execute()
        if pending is not None:
            started = (meta is not None and meta.get("status") == "STARTED") or int(starts or 0) > 0
            return Seen("running" if started else "queued")
        stored = await run_in_threadpool(self.client.result_store.read, job_id)
        return _ended(stored) if stored is not None else Seen("unknown")

    async def wait(self, job_id: str, timeout_s: float) -> Seen:
        """The job's state once it has ended, or after `timeout_s` seconds, whichever comes first."""
        deadline = time.monotonic() + timeout_s
        seen = await self.state(job_id)
        while seen.state in ("queued", "running") and (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(POLL_S, left))
            meta = await self._meta(job_id)
            if meta is not None and meta.get("status") in READY_STATES:
                return _ended(from_celery(job_id, meta["status"], meta["result"]))
        if seen.state in ("queued", "running"):
            seen = await self.state(job_id)  # it may have ended between the last poll and the deadline
        return seen
