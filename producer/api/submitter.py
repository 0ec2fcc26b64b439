"""Jobs sent from one thread, many per round trip: the API's group commit.

Each request's job waits in a queue; the sending thread takes every job waiting (up to `max_batch`) and sends them
with one `Client.send_once` call (claims, stale results dropped, ledger entries and messages: a few pipelined Redis
round trips for the lot). Under load that is one round trip per many requests instead of five per request, and one
thread touching Redis instead of a pool of them fighting for the GIL; a lone request goes at once, alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from producer.client import Client
from producer.core.jobs import Job
from producer.core.publish import Priority

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job_id: str
    payload: dict[str, Any]
    priority: Priority
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[bool]


def _resolve(future: asyncio.Future[bool], sent: bool | BaseException) -> None:
    if future.done():  # the request went away
        return
    if isinstance(sent, BaseException):
        future.set_exception(sent)
    else:
        future.set_result(sent)


class Submitter:
    """One sending thread per API process."""

    def __init__(self, client: Client, max_batch: int = 500) -> None:
        self.client = client
        self.max_batch = max_batch
        self.waiting: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="vlmq-api-submit", daemon=True)
        self.thread.start()

    async def send(self, job: Job, priority: Priority) -> bool:
        """Send a validated job unless its id is queued, running or succeeded; returns whether it was sent.

        Raises:
            redis.RedisError: Redis could not be reached (nothing was sent).
        """
        if job.submitted_at is None:
            job.submitted_at = datetime.now(UTC)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        payload = job.model_dump(mode="json", exclude_none=True)
        self.waiting.put(_Pending(job.id, payload, priority, loop, future))
        return await future

    def close(self) -> None:
        self.waiting.put(None)

    def _run(self) -> None:
        while (first := self.waiting.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.waiting.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._send(batch)

    def _send(self, batch: list[_Pending]) -> None:
        groups: dict[Priority, list[_Pending]] = defaultdict(list)
        for item in batch:
            groups[item.priority].append(item)
        for priority, items in groups.items():
            outcome: list[bool] | BaseException
            try:
                outcome = self.client.send_once([(i.job_id, i.payload) for i in items], priority)
            except Exception as exc:
                log.warning("could not send %d jobs: %s", len(items), exc)
                outcome = exc
            for n, item in enumerate(items):
                sent = outcome if isinstance(outcome, BaseException) else outcome[n]
                item.loop.call_soon_threadsafe(_resolve, item.future, sent)
