"""A job's state and result as the API reports them, and long-polling for a result without holding a thread.

Where a job's state comes from, in this order (each is right when the ones before it say nothing):
1. Celery's result meta in Redis: the result once it ends (`STARTED` while a worker runs it);
2. the ledger's pending jobs: sent and not finished, so `queued` (or `running` once a worker counted a start);
3. the S3 result object: the result after Redis let it expire;
4. none of these: the id is unknown.
Reading Redis before S3 keeps a failed job that is submitted again from showing its old result while it reruns.

Long polls do not poll one by one: one task per process reads every awaited job's result with one MGET every 50 ms,
so a thousand waiting requests cost 20 round trips a second, not 20,000.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from producer.client import Client
from producer.core.jobs import JobResult
from producer.core.results import READY_STATES, from_celery

log = logging.getLogger(__name__)
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
        self.waiting: dict[str, set[asyncio.Future[JobResult]]] = {}  # job id -> requests waiting for its result
        self.poller: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
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
        seen = await self.state(job_id)
        if seen.state not in ("queued", "running") or timeout_s <= 0:
            return seen
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(job_id, set()).add(future)
        if self.poller is None or self.poller.done():
            self.poller = asyncio.create_task(self._poll())
        try:
            return _ended(await asyncio.wait_for(asyncio.shield(future), timeout_s))
        except TimeoutError:
            return await self.state(job_id)  # it may have ended between the last poll and the deadline
        finally:
            futures = self.waiting.get(job_id, set())
            futures.discard(future)
            if not futures:
                self.waiting.pop(job_id, None)

    async def _poll(self) -> None:
        """While requests wait: one MGET of every awaited job's result every POLL_S, however many wait."""
        while self.waiting:
            ids = list(self.waiting)
            try:
                raws = await self.results.mget([self.backend.get_key_for_task(i) for i in ids])
            except Exception as exc:  # Redis away for a moment: the waits time out, or it comes back
                log.warning("could not read results for %d waiting requests: %s", len(ids), exc)
                raws = [None] * len(ids)
            for job_id, raw in zip(ids, raws, strict=True):
                meta = None if raw is None else dict(self.backend.decode_result(raw))
                if meta is not None and meta.get("status") in READY_STATES:
                    result = from_celery(job_id, meta["status"], meta["result"])
                    for future in self.waiting.pop(job_id, set()):
                        if not future.done():
                            future.set_result(result)
            await asyncio.sleep(POLL_S)
