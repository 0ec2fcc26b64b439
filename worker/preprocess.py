"""A job's media fetched, decoded and prepared for the engine, in the worker's process or in a pool of processes.

One worker process runs its engine and everything else per job under one GIL: the S3 read, Pillow and decord, and
the processor (chat template, tokenizer, image processor) cost more CPU than the model's loop can spare on a fast
GPU (BENCHMARKS.md, "Per-job overhead"). With `--preprocess-workers N` (on by default: the cores per worker minus
one) that work runs in N processes of its own, and so does the recording of each job's end (the S3 result write,
the ledger and batch counts in Redis: `Finisher.record`), which leaves the engine's process the model, Celery and
the hand-over:

- the engine process hands a process one task at a time (a `Job`, or a result to record; a few KB) and gets back
  the engine's request; its large tensors come back in shared memory (`torch.multiprocessing`'s reductions, as
  DataLoader workers use), not pickled byte by byte;
- a job's failure there (a limit, a missing object, a processor error) is its coded `VlmqError`, as in-process;
- a process that dies (SIGKILL, the kernel's OOM killer, a crashing decoder) is replaced, and the jobs it held are
  prepared again, each alone in a process, so a job that kills processes takes no neighbour with it twice; a job
  held by `VLMQ_MAX_CRASHES` dead processes fails `worker_lost`, as a job that kills whole workers does;
- a decoder that hangs past `VLMQ_MAX_DECODE_S` fails its job and retires its process (it is replaced), instead
  of restarting the whole worker as in-process decoding must.

The pool itself (processes, pipes, crashes) is worker/pool.py; this module is what runs in its processes.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from producer.core.endings import Endings
from producer.core.jobs import Job, JobResult
from producer.core.ledger import Ledger
from producer.core.results import ResultStore
from worker import media
from worker.engines.base import Decoded, Preparation, Prepare, Shareable
from worker.errors import DecodeHung, ResultWriteFailed, VlmqError
from worker.hooks import Hooks
from worker.lifecycle import Finisher
from worker.metrics import Metrics
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# Tasks one process holds at once: S3 reads and result writes wait on the network while another runs the processor.
JOBS_PER_PROCESS = 4


# -- what crosses the pipe between the pool (worker/pool.py) and a process ---------------------------------------------
@dataclass(frozen=True)
class PrepareTask:
    """Prepare a job (its JSON: cheaper to send than the pickled model)."""

    key: int
    job: str


@dataclass(frozen=True)
class RecordTask:
    """Record a job's end (`Finisher.record`'s arguments; the result as JSON)."""

    key: int
    result: str
    job: Any
    dead: bool


@dataclass(frozen=True)
class Ready:
    """The process has built its preparation and takes tasks."""


@dataclass(frozen=True)
class StartFailed:
    """The process could not start (its preparation could not be built); it exits."""

    reason: str


@dataclass(frozen=True)
class Done:
    """A task's outcome: the engine's request, None (recorded), or the job's `VlmqError`."""

    key: int
    outcome: Any


@dataclass(frozen=True)
class Retire:
    """A decoder hung in this process: it takes no more tasks and is replaced."""


Task = PrepareTask | RecordTask
Message = Ready | StartFailed | Done | Retire


class Preprocessor:
    """Fetch, decode and prepare one job: what a task thread does in-process, or a pool process does for it."""

    def __init__(self, settings: WorkerSettings, s3_client: Any, prepare: Prepare | None, hooks: Hooks):
        self.fetcher = media.MediaFetcher(settings, s3_client)
        self.prepare = prepare  # None: the request is the decoded media (`Decoded`)
        self.hooks = hooks

    def __call__(self, job: Job) -> Any:
        """The engine's request for `job`; raises the job's `VlmqError`."""
        items = job.all_media()
        self.hooks.preparing([item.uri for item in items])
        media.check_media_count(len(items), self.fetcher.settings)
        images, videos = [], []
        for item in items:
            decoded = media.load(self.fetcher, item, job.video, self.hooks.decoding)
            if isinstance(decoded, media.Video):
                videos.append(decoded.frames)
            else:
                images.append(decoded)
        if self.prepare is None:
            return Decoded(job.conversation(), images, videos, job.generation)
        return self.prepare(job.conversation(), images, videos, job.generation)


def serve(conn: Connection, settings: WorkerSettings, preparation: Preparation, hooks: Hooks) -> None:
    """A preprocessing process: prepare the jobs and record the results the pool sends, JOBS_PER_PROCESS at a time,
    until the pipe closes."""
    import torch.multiprocessing  # registers the reductions that send tensors through shared memory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s preprocess[%(process)d] %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the pool gives the parallelism; an intra-op pool per process would oversubscribe
    try:
        preprocessor, finisher = _preprocessor(settings, preparation, hooks)
    except Exception as exc:  # told to the engine process, which refuses to start
        conn.send(StartFailed(f"{type(exc).__name__}: {exc}"))
        return
    send_lock = threading.Lock()

    def send(message: Message) -> None:
        with send_lock:
            try:
                conn.send(message)
            except (EOFError, OSError):  # the engine process is gone
                os._exit(0)
            except Exception as exc:  # it did not pickle: still one coded error for the job
                assert isinstance(message, Done)
                error = VlmqError(f"unexpected: its prepared inputs could not be sent ({exc})")
                conn.send(Done(message.key, error))

    def run(task: Task) -> None:
        try:
            if isinstance(task, RecordTask):
                send(Done(task.key, _record(finisher, JobResult.model_validate_json(task.result), task.job, task.dead)))
            else:
                send(Done(task.key, shared(preprocessor(Job.model_validate_json(task.job)))))
        except DecodeHung as exc:
            send(Done(task.key, exc))
            send(Retire())
        except VlmqError as exc:
            send(Done(task.key, exc))
        except Exception as exc:  # a bug, still one coded error for this job
            kind = type(task).__name__
            log.exception("unexpected error in a %s", kind)
            send(Done(task.key, VlmqError(f"unexpected {type(exc).__name__} in its {kind}: {exc}. This is a vlmq bug")))

    send(Ready())
    with ThreadPoolExecutor(JOBS_PER_PROCESS, thread_name_prefix="vlmq-prepare") as threads:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):  # the engine process is gone
                os._exit(0)
            threads.submit(run, task)


def _preprocessor(settings: WorkerSettings, preparation: Preparation, hooks: Hooks) -> tuple[Preprocessor, Finisher]:
    from producer.core.storage import make_s3_client

    s3 = make_s3_client(settings, max_connections=JOBS_PER_PROCESS + 2)
    endings = Endings(ResultStore(s3, settings), Ledger(settings), settings.webhook_secret)
    finisher = Finisher(endings, Metrics())
    return Preprocessor(settings, s3, preparation.build(), hooks), finisher


def _record(finisher: Finisher, result: JobResult, job: Any, dead: bool) -> ResultWriteFailed | None:
    def stop(exc: ResultWriteFailed) -> None:
        raise exc

    try:
        finisher.record(result, job, dead=dead, write_failed=stop)
    except ResultWriteFailed as exc:  # nothing else was recorded: the engine process decides (retry, or go on)
        return exc
    return None


def shared(request: Any) -> Any:
    """A request ready to cross to the engine's process: its large tensors in shared memory when it is `Shareable`
    (`Decoded`, the hf engine's `Prepared`), the rest pickled."""
    return request.shared() if isinstance(request, Shareable) else request


def restored(request: Any) -> Any:
    """`shared` undone in the engine's process."""
    return request.restored() if isinstance(request, Shareable) else request
