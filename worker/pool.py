"""The preprocessing pool: `--preprocess-workers` processes that prepare jobs and record results for the engine's
process (what they do and why: worker/preprocess.py).

`concurrent.futures.ProcessPoolExecutor` cannot serve: one dead process breaks the whole pool (every pending job
fails) and it cannot say which job killed it; `multiprocessing.Pool` waits for ever on a dead process's task.
Here each process has its own pipe and the pool knows which tasks each holds.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from producer.core.jobs import Job, JobResult
from worker.engines.base import Preparation
from worker.errors import ConfigError, WorkerLost
from worker.hooks import Hooks
from worker.metrics import Metrics
from worker.preprocess import (
    JOBS_PER_PROCESS,
    Done,
    Message,
    PrepareTask,
    Ready,
    RecordTask,
    Retire,
    StartFailed,
    Task,
    restored,
    serve,
)
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0


class PoolClosed(WorkerLost):
    """The worker stopped while the job was being prepared; a retry runs it again (on any worker)."""

    retryable = True


@dataclass
class _Task:
    task: Task
    future: Future[Any]
    job_id: str
    crashes: int = 0  # processes that died holding it; once one has, it runs alone

    @property
    def key(self) -> int:
        return self.task.key


@dataclass
class _Process:
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    held: dict[int, _Task] = field(default_factory=dict)
    ready: bool = False
    retiring: bool = False
    alone: bool = False  # it holds a job that was held by a process that died: nothing else goes to it
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class PreprocessPool:
    """`workers` processes running `Preprocessor` for the engine process (see the module's docstring)."""

    def __init__(self, settings: WorkerSettings, workers: int, preparation: Preparation, hooks: Hooks) -> None:
        self.settings = settings
        self.workers = workers
        self.preparation = preparation  # what each process builds to prepare the engine's requests
        self.hooks = hooks
        self.metrics = Metrics()  # replaced by the worker's in `wait_ready`
        self._context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA and threads
        self._procs: list[_Process] = []
        self._pending: collections.deque[_Task] = collections.deque()
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._started = False
        self._wake_r, self._wake_w = self._context.Pipe(duplex=False)
        self._collector = threading.Thread(target=self._collect, name="vlmq-preprocess", daemon=True)

    def start(self) -> None:
        """Start the processes (they load their processors while the engine loads its model)."""
        import torch.multiprocessing  # noqa: F401  registers the shared-memory reductions for tensors

        with self._lock:
            self._procs = [self._spawn() for _ in range(self.workers)]

    def wait_ready(self, metrics: Metrics) -> None:
        """Wait until each process has loaded its processor, then start handing out jobs.

        Raises:
            ConfigError: a process could not start (the processor cannot be loaded, for one).
        """
        self.metrics = metrics
        deadline = time.monotonic() + START_TIMEOUT_S
        for proc in self._procs:
            if not proc.conn.poll(max(0.0, deadline - time.monotonic())):
                raise ConfigError(f"a preprocessing process did not start within {START_TIMEOUT_S:g} s")
            self._on_message(proc, proc.conn.recv())
        self._started = True
        self._collector.start()
        log.info("preprocessing in %d processes (--preprocess-workers)", self.workers)

    def submit(self, job: Job) -> Future[Any]:
        """Queue `job`; the future holds the engine's request, or the job's `VlmqError`."""
        return self._queue(lambda key: PrepareTask(key, job.model_dump_json()), job.id)

    def record(self, result: JobResult, job: Any, dead: bool) -> Future[Any]:
        """Record a job's end in a pool process (`Finisher.record`: S3, ledger, dead letters, batch count); the
        future holds None, or the `ResultWriteFailed` of an S3 write that failed before anything else was recorded."""
        return self._queue(lambda key: RecordTask(key, result.model_dump_json(), job, dead), result.id)

    def _queue(self, task: Callable[[int], Task], job_id: str) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the preprocessing pool is closed")
            self._pending.append(_Task(task(next(self._keys)), future, job_id))
            self._dispatch()
        return future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            procs = list(self._procs)
        self._wake_w.send(None)
        for proc in procs:
            proc.process.kill()
            proc.process.join(5)
        with self._lock:
            tasks = [*self._pending, *(task for proc in procs for task in proc.held.values())]
            self._pending.clear()
        for task in tasks:
            task.future.set_exception(PoolClosed("the worker shut down while this job was being prepared"))

    # -- the collector thread and what it calls, under self._lock unless said ---------------------------------------
    def _spawn(self) -> _Process:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=serve,
            args=(theirs, self.settings, self.preparation, self.hooks),
            name="vlmq-preprocess",
            daemon=True,
        )
        process.start()
        theirs.close()
        return _Process(process, ours)

    def _dispatch(self) -> None:
        """Hand pending jobs, in order, to the ready processes holding fewest (up to JOBS_PER_PROCESS each); a job
        whose process died waits for a process holding nothing, and has it to itself."""
        while self._pending:
            task = self._pending[0]
            usable = [p for p in self._procs if p.ready and not p.retiring and not p.alone]
            room = JOBS_PER_PROCESS if task.crashes else 1
            free = [p for p in usable if len(p.held) + room <= JOBS_PER_PROCESS]
            if not free:
                return
            proc = min(free, key=lambda p: len(p.held))
            self._pending.popleft()
            if not task.crashes and not task.future.set_running_or_notify_cancel():
                continue
            proc.held[task.key] = task
            proc.alone = task.crashes > 0
            try:
                with proc.send_lock:
                    proc.conn.send(task.task)
            except OSError:  # it died: the collector sees its sentinel and handles what it held
                return

    def _collect(self) -> None:
        by_handle: dict[Any, _Process] = {}
        while True:
            with self._lock:
                if self._closed:
                    return
                if len(by_handle) != 2 * len(self._procs) or any(p.conn not in by_handle for p in self._procs):
                    by_handle = {h: p for p in self._procs for h in (p.conn, p.process.sentinel)}
            for ready in wait([*by_handle, self._wake_r]):
                if ready is self._wake_r:
                    return
                proc = by_handle[ready]
                try:
                    if ready is proc.conn:
                        self._receive(proc)
                    else:  # it exited: take what it sent before, then replace it
                        while self._receive(proc):
                            pass
                except Exception:  # a bug here must not stop the thread every waiting job depends on
                    log.exception("preprocessing pool: unexpected error handling a process's message")

    def _receive(self, proc: _Process) -> bool:
        """Handle one message from `proc`; False (and `proc` replaced) once its pipe is closed."""
        try:
            if proc.conn.closed or not proc.conn.poll():
                if proc.process.is_alive():
                    return False
                raise EOFError
            message = proc.conn.recv()
        except (EOFError, OSError):
            self._replace(proc)
            return False
        with self._lock:
            self._on_message(proc, message)
            self._dispatch()
        return True

    def _on_message(self, proc: _Process, message: Message) -> None:
        if isinstance(message, Ready):
            proc.ready = True
        elif isinstance(message, StartFailed):  # it exits; a replacement is started when its sentinel fires
            if not self._started:
                raise ConfigError(f"a preprocessing process could not start: {message.reason}")
            log.error("a preprocessing process could not start: %s", message.reason)
        elif isinstance(message, Retire):  # its decoder hung: it takes no more jobs and is replaced once it holds none
            proc.retiring = True
            self._procs.append(self._spawn())
        elif isinstance(message, Done):
            future = proc.held.pop(message.key).future
            proc.alone = False
            if isinstance(message.outcome, BaseException):
                future.set_exception(message.outcome)
            else:
                future.set_result(restored(message.outcome))
        if proc.retiring and not proc.held:
            proc.process.kill()

    def _replace(self, proc: _Process) -> None:
        proc.process.join(5)
        with self._lock:
            if proc not in self._procs:
                return
            self._procs.remove(proc)
            code = proc.process.exitcode
            if not proc.retiring:
                log.error(
                    "a preprocessing process died (exit %s) holding %d job(s); starting another", code, len(proc.held)
                )
                self.metrics.preprocess_restarts.inc()
                if not self._closed:
                    self._procs.append(self._spawn())
            for task in reversed(proc.held.values()):
                self._crashed(task, code)
            proc.held.clear()
            self._dispatch()
        proc.conn.close()

    def _crashed(self, task: _Task, code: int | None) -> None:
        """`task`'s process died: prepare it again alone, or fail it once VLMQ_MAX_CRASHES processes died on it."""
        task.crashes += 1
        if task.crashes < self.settings.max_crashes:
            log.warning("job %s: its preprocessing process died (exit %s); sending it again alone", task.job_id, code)
            self._pending.appendleft(task)
            return
        task.future.set_exception(
            WorkerLost(
                f"its preprocessing process died {task.crashes} times while preparing it (last exit {code}), the last "
                f"{task.crashes - 1} with no other job, so it was not tried again. Its media may crash the decoder: "
                "check them, then `vlmq retry-failed`"
            )
        )
