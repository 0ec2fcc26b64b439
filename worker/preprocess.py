"""A job's media fetched, decoded and prepared for the engine, in the worker's process or in a pool of processes.

One worker process runs its engine and everything else per job under one GIL: the S3 read, Pillow and decord, and
the processor (chat template, tokenizer, image processor) cost more CPU than the model's loop can spare on a fast
GPU (BENCHMARKS.md, "Per-job overhead"). With `--preprocess-workers N` (the default on a GPU) that work runs in N
processes of its own:

- the engine process hands each process one job at a time (`Job`, a few KB) and gets back the engine's request;
  its tensors come back in shared memory (`torch.multiprocessing`'s reductions, as DataLoader workers use), not
  pickled byte by byte;
- a job's failure there (a limit, a missing object, a processor error) is its coded `VlmqError`, as in-process;
- a process that dies (SIGKILL, the kernel's OOM killer, a crashing decoder) is replaced, and the jobs it held are
  prepared again, each alone in a process, so a job that kills processes takes no neighbour with it twice; a job
  held by `VLMQ_MAX_CRASHES` dead processes fails `worker_lost`, as a job that kills whole workers does;
- a decoder that hangs past `VLMQ_MAX_DECODE_S` fails its job and retires its process (it is replaced), instead
  of restarting the whole worker as in-process decoding must.

`concurrent.futures.ProcessPoolExecutor` cannot serve: one dead process breaks the whole pool (every pending job
fails) and it cannot say which job killed it; `multiprocessing.Pool` waits for ever on a dead process's task.
Here each process has its own pipe and the pool knows which jobs each holds.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch
from PIL import Image

from producer.jobs import Generation, Job
from worker import media
from worker.devtools.faults import Faults
from worker.errors import ConfigError, DecodeHung, VlmqError, WorkerLost
from worker.metrics import Metrics
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

JOBS_PER_PROCESS = 2  # jobs one process holds at once: one reads S3 while the other runs the processor
START_TIMEOUT_S = 600.0
Prepare = Callable[[list[dict[str, Any]], list[Image.Image], list[np.ndarray], Generation], Any]


@dataclass
class Loaded:
    """A job's decoded media, for an engine whose `prepare` runs in the engine process (vllm: its own processor)."""

    conversation: list[dict[str, Any]]
    images: list[Image.Image]
    videos: list[Any]  # frames as torch tensors across processes (shared memory), numpy arrays in one
    generation: Generation

    def frames(self) -> list[np.ndarray]:
        return [v.numpy() if isinstance(v, torch.Tensor) else v for v in self.videos]


class PoolClosed(WorkerLost):
    """The worker stopped while the job was being prepared; a retry runs it again (on any worker)."""

    retryable = True


class Preprocessor:
    """Fetch, decode and prepare one job: what a task thread does in-process, or a pool process does for it."""

    def __init__(self, settings: WorkerSettings, s3_client: Any, prepare: Prepare | None, faults: Faults | None):
        self.fetcher = media.MediaFetcher(settings, s3_client)
        self.prepare = prepare  # None: return the decoded media (`Loaded`)
        self.faults = faults

    def __call__(self, job: Job) -> Any:
        """The engine's request for `job` (or its `Loaded` media); raises the job's `VlmqError`."""
        items = job.all_media()
        if self.faults is not None:
            self.faults.on_prepare([item.uri for item in items])
        media.check_media_count(len(items), self.fetcher.settings)
        images, videos = [], []
        before_decode = self.faults.on_decode if self.faults is not None else None
        for item in items:
            decoded = media.load(self.fetcher, item, job.video, before_decode)
            if isinstance(decoded, media.Video):
                videos.append(decoded.frames)
            else:
                images.append(decoded)
        if self.prepare is None:
            return Loaded(job.conversation(), images, videos, job.generation)
        return self.prepare(job.conversation(), images, videos, job.generation)


@dataclass
class _Task:
    key: int
    future: Future[Any]
    job: Job
    crashes: int = 0  # processes that died holding it; once one has, it runs alone


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

    def __init__(self, settings: WorkerSettings, workers: int, prepares: bool) -> None:
        self.settings = settings
        self.workers = workers
        self.prepares = prepares  # False: the processes decode only (the engine prepares)
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
        """Queue `job`; the future holds the engine's request (or `Loaded`), or the job's `VlmqError`."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the preprocessing pool is closed")
            self._pending.append(_Task(next(self._keys), future, job))
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
            target=_serve, args=(theirs, self.settings, self.prepares), name="vlmq-preprocess", daemon=True
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
            room = 1 if task.crashes else JOBS_PER_PROCESS
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
                    proc.conn.send((task.key, task.job))
            except OSError:  # it died: the collector sees its sentinel and handles what it held
                return

    def _collect(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                by_handle: dict[Any, _Process] = {}
                for proc in self._procs:
                    by_handle[proc.conn] = proc
                    by_handle[proc.process.sentinel] = proc
            for ready in wait([*by_handle, self._wake_r]):
                if ready is self._wake_r:
                    return
                proc = by_handle[ready]
                if ready is proc.conn:
                    self._receive(proc)
                else:  # it exited: take what it sent before, then replace it
                    while self._receive(proc):
                        pass

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

    def _on_message(self, proc: _Process, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            proc.ready = True
        elif kind == "failed to start":  # it exits; a replacement is started when its sentinel fires
            if not self._started:
                raise ConfigError(f"a preprocessing process could not start: {message[1]}")
            log.error("a preprocessing process could not start: %s", message[1])
        elif kind == "retire":  # its decoder hung: it takes no more jobs and is replaced once it holds none
            proc.retiring = True
            self._procs.append(self._spawn())
        else:
            _, key, outcome = message
            future = proc.held.pop(key).future
            proc.alone = False
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
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
            log.warning("job %s: its preprocessing process died (exit %s); preparing it again alone", task.job.id, code)
            self._pending.appendleft(task)
            return
        task.future.set_exception(
            WorkerLost(
                f"its preprocessing process died {task.crashes} times while preparing it (last exit {code}), the last "
                f"{task.crashes - 1} with no other job, so it was not tried again. Its media may crash the decoder: "
                "check them, then `vlmq retry-failed`"
            )
        )


def _serve(conn: Connection, settings: WorkerSettings, prepares: bool) -> None:
    """A preprocessing process: prepare the jobs the pool sends, two at a time, until the pipe closes."""
    import torch.multiprocessing

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s preprocess[%(process)d] %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the pool gives the parallelism; an intra-op pool per process would oversubscribe
    try:
        preprocessor = _preprocessor(settings, prepares)
    except Exception as exc:  # told to the engine process, which refuses to start
        conn.send(("failed to start", f"{type(exc).__name__}: {exc}"))
        return
    send_lock = threading.Lock()

    def send(key: int, outcome: Any) -> None:
        with send_lock:
            try:
                conn.send(("done", key, outcome))
            except (EOFError, OSError):  # the engine process is gone
                os._exit(0)
            except Exception as exc:  # it did not pickle: still one coded error for the job
                conn.send(("done", key, VlmqError(f"unexpected: its prepared inputs could not be sent ({exc})")))

    def run(key: int, job: Job) -> None:
        try:
            send(key, _shareable(preprocessor(job)))
        except DecodeHung as exc:
            send(key, exc)
            with send_lock:
                conn.send(("retire",))
        except VlmqError as exc:
            send(key, exc)
        except Exception as exc:  # a bug, still one coded error for this job
            log.exception("job %s: unexpected error while preparing it", job.id)
            send(key, VlmqError(f"unexpected {type(exc).__name__} while preparing: {exc}. This is a vlmq bug"))

    conn.send(("ready",))
    with ThreadPoolExecutor(JOBS_PER_PROCESS, thread_name_prefix="vlmq-prepare") as threads:
        while True:
            try:
                key, job = conn.recv()
            except (EOFError, OSError):  # the engine process is gone
                os._exit(0)
            threads.submit(run, key, job)


def _preprocessor(settings: WorkerSettings, prepares: bool) -> Preprocessor:
    from producer.storage import make_s3_client
    from worker.engines.hf_model import VisionLanguageModel

    prepare = VisionLanguageModel.processor_only(settings.model).prepare if prepares else None
    s3 = make_s3_client(settings, max_connections=JOBS_PER_PROCESS + 2)
    return Preprocessor(settings, s3, prepare, Faults.parse(settings.faults))


def _shareable(outcome: Any) -> Any:
    """Video frames as tensors, which cross to the engine process in shared memory."""
    if isinstance(outcome, Loaded):
        outcome.videos = [torch.from_numpy(np.ascontiguousarray(v)) for v in outcome.videos]
    return outcome
