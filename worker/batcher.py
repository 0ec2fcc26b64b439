"""Dynamic micro-batcher: many producer threads submit items, one consumer thread runs them in batches.

Pure Python (no Celery, no torch) so its policy can be tested with a fake clock:

- items carry a key; only items with equal keys share a batch (same generation settings, same media kind);
- a batch holds at most `max_batch_size` items, and only as many as `fits` accepts (the engine's memory: a batch of
  long prompts holds fewer jobs); a key's items flush as soon as its batch is full;
- otherwise the oldest waiting item's key flushes when that item has waited `max_wait_s`, taking whatever of its
  key is ready, or at once when `incoming` says no other job is on its way (waiting could not fill it).

While the consumer runs a batch, new items keep arriving; when it comes back, anything whose wait is over
flushes at once, so under load batches fill up and the model never idles waiting for a timer.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Handler = Callable[[list[T]], "Sequence[R | BaseException] | Future[Sequence[R | BaseException]]"]


class BatcherClosed(RuntimeError):
    """The batcher was closed before the item ran."""


class Incoming:
    """A count of the jobs on their way to a batcher (being fetched, decoded, prepared, handed over): while there
    are some, a partial batch may wait for them. A job counts until it is in the batcher, so when the count reaches
    0 nothing is about to arrive; listeners (the batcher) hear of each job that stops counting."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def listen(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    @contextmanager
    def job(self) -> Iterator[None]:
        """Count one job for the duration of the block (its preparation and its hand-over to the batcher)."""
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
            for listener in self._listeners:
                listener()

    def any(self) -> bool:
        """Whether some job is on its way."""
        return self._count > 0


@dataclass
class Pending(Generic[T, R]):
    """An item waiting for its batch."""

    item: T
    key: Hashable
    enqueued_at: float
    seq: int
    future: Future[R] = field(default_factory=Future)


class Batcher(Generic[T, R]):
    """Collects items from many threads and hands them to `handler` in batches of compatible items.

    Args:
        handler: runs one batch; returns one result or exception per item, in order, or a future of them (the
            batch runs elsewhere and the batcher goes on to form the next). An exception it raises fails every item
            of that batch, and the batcher carries on.
        max_batch_size: most items per batch.
        max_wait_s: longest the oldest waiting item waits for batch-mates.
        fits: whether a batch of these items (same key, arrival order) may run together; a lone item always may.
        incoming: the items on their way; while there are none, a partial batch does not wait for more (None: it
            always waits up to `max_wait_s`).
        clock: monotonic clock in seconds; tests pass a fake one.
    """

    def __init__(
        self,
        handler: Handler[T, R],
        *,
        max_batch_size: int,
        max_wait_s: float,
        fits: Callable[[list[T]], bool] | None = None,
        incoming: Incoming | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._handler = handler
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._fits = fits
        self._incoming = incoming
        if incoming is not None:
            incoming.listen(self._wake)
        self._clock = clock
        self._pending: list[Pending[T, R]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- producer side ---------------------------------------------------------------------------------------
    def submit(self, item: T, key: Hashable = None) -> Future[R]:
        """Queue `item` for a batch of items with an equal `key`; the future resolves to its own result."""
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed; the worker is shutting down")
            pending: Pending[T, R] = Pending(item, key, self._clock(), next(self._seq))
            self._pending.append(pending)
            self._cond.notify()
        return pending.future

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- policy ------------------------------------------------------------------------------------------------
    def poll(self) -> tuple[list[Pending[T, R]] | None, float | None]:
        """Take the next batch that is due, if any.

        Returns:
            `(batch, None)` when a batch is due (its items are removed from the queue), or `(None, wait_s)`:
            nothing is due for `wait_s` seconds unless new items arrive (`None`: nothing is waiting at all).
        """
        with self._cond:
            return self._poll_locked()

    def _poll_locked(self) -> tuple[list[Pending[T, R]] | None, float | None]:
        if not self._pending:
            return None, None
        groups: dict[Hashable, list[Pending[T, R]]] = {}
        for p in self._pending:  # arrival order, so each group's head is its oldest item
            groups.setdefault(p.key, []).append(p)
        batches = {key: self._batch_of(group) for key, group in groups.items()}
        full = [batch for batch, is_full in batches.values() if is_full]
        oldest = self._pending[0]
        if full:
            batch = min(full, key=lambda b: b[0].seq)
        else:
            waited = self._clock() - oldest.enqueued_at
            more_coming = self._incoming is None or self._incoming.any()
            if waited < self.max_wait_s and not self._closed and more_coming:
                return None, self.max_wait_s - waited
            batch = batches[oldest.key][0]
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        return batch, None

    def _batch_of(self, group: list[Pending[T, R]]) -> tuple[list[Pending[T, R]], bool]:
        """The head of a key's group that may run together, and whether it is full (no further item would join)."""
        batch = group[: self.max_batch_size]
        if self._fits is not None:
            n = 1
            while n < len(batch) and self._fits([p.item for p in batch[: n + 1]]):
                n += 1
            if n < len(batch):
                return batch[:n], True
        return batch, len(batch) == self.max_batch_size

    # -- consumer side -----------------------------------------------------------------------------------------
    def run_batch(self, batch: list[Pending[T, R]]) -> None:
        """Run one batch through the handler and resolve each item's future with its own outcome."""
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            outcomes = self._handler([p.item for p in live])
        except BaseException as exc:  # a handler crash fails this batch only
            outcomes = [exc] * len(live)
        if isinstance(outcomes, Future):
            outcomes.add_done_callback(lambda done: self._resolve(live, done))
        else:
            self._resolve(live, outcomes)

    @staticmethod
    def _resolve(
        live: list[Pending[T, R]], outcomes: Sequence[R | BaseException] | Future[Sequence[R | BaseException]]
    ) -> None:
        try:
            results = list(outcomes.result() if isinstance(outcomes, Future) else outcomes)
            if len(results) != len(live):
                raise RuntimeError(f"batch handler returned {len(results)} outcomes for {len(live)} items")
        except BaseException as exc:
            results = [exc] * len(live)
        for p, outcome in zip(live, results, strict=True):
            if isinstance(outcome, BaseException):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(outcome)

    def next_batch(self, timeout: float | None = None) -> list[Pending[T, R]] | None:
        """Block until a batch is due (or `timeout` passes, or the batcher is closed and empty)."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                batch, wait = self._poll_locked()
                if batch is not None:
                    return batch
                if self._closed and not self._pending:
                    return None
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def serve_forever(self) -> None:
        """Run batches until `close()` is called and the queue is drained."""
        while (batch := self.next_batch()) is not None:
            self.run_batch(batch)

    def start(self, name: str = "vlmq-batcher") -> threading.Thread:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        self._thread.start()
        return self._thread

    def close(self, timeout: float | None = None) -> None:
        """Stop taking items, run what is queued, and wait for the serving thread to finish."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
