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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from PIL import Image

from producer.jobs import Generation, Job, JobResult
from producer.ledger import Ledger
from producer.results import ResultStore
from worker import media
from worker.devtools.faults import Faults
from worker.engines.hf_model import Prepared
from worker.errors import DecodeHung, ResultWriteFailed, VlmqError
from worker.lifecycle import Finisher
from worker.metrics import Metrics
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# Tasks one process holds at once: S3 reads and result writes wait on the network while another runs the processor.
JOBS_PER_PROCESS = 4
SHARED_MIN_BYTES = 64 * 1024
Prepare = Callable[[list[dict[str, Any]], list[Image.Image], list[np.ndarray], Generation], Any]


@dataclass
class Loaded:
    """A job's decoded media, for an engine whose `prepare` runs in the engine process (vllm: its own processor)."""

    conversation: list[dict[str, Any]]
    images: list[Image.Image]
    videos: list[Any]  # frames: numpy arrays, torch tensors while they cross processes (`shareable`)
    generation: Generation


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


def serve(conn: Connection, settings: WorkerSettings, prepares: bool) -> None:
    """A preprocessing process: prepare the jobs and record the results the pool sends, JOBS_PER_PROCESS at a time,
    until the pipe closes."""
    import torch.multiprocessing  # registers the reductions that send tensors through shared memory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s preprocess[%(process)d] %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the pool gives the parallelism; an intra-op pool per process would oversubscribe
    try:
        preprocessor, finisher = _preprocessor(settings, prepares)
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

    def run(key: int, kind: str, payload: Any) -> None:
        try:
            if kind == "record":
                result, job, dead = payload
                send(key, _record(finisher, JobResult.model_validate_json(result), job, dead))
            else:
                send(key, shareable(preprocessor(Job.model_validate_json(payload))))
        except DecodeHung as exc:
            send(key, exc)
            with send_lock:
                conn.send(("retire",))
        except VlmqError as exc:
            send(key, exc)
        except Exception as exc:  # a bug, still one coded error for this job
            log.exception("unexpected error in a %s task", kind)
            send(key, VlmqError(f"unexpected {type(exc).__name__} in its {kind} task: {exc}. This is a vlmq bug"))

    conn.send(("ready",))
    with ThreadPoolExecutor(JOBS_PER_PROCESS, thread_name_prefix="vlmq-prepare") as threads:
        while True:
            try:
                key, kind, payload = conn.recv()
            except (EOFError, OSError):  # the engine process is gone
                os._exit(0)
            threads.submit(run, key, kind, payload)


def _preprocessor(settings: WorkerSettings, prepares: bool) -> tuple[Preprocessor, Finisher]:
    from producer.storage import make_s3_client
    from worker.engines.hf_model import VisionLanguageModel

    prepare = VisionLanguageModel.processor_only(settings.model).prepare if prepares else None
    s3 = make_s3_client(settings, max_connections=JOBS_PER_PROCESS + 2)
    finisher = Finisher(ResultStore(s3, settings), Ledger(settings), Metrics(), settings.webhook_secret)
    return Preprocessor(settings, s3, prepare, Faults.parse(settings.faults)), finisher


def _record(finisher: Finisher, result: JobResult, job: Any, dead: bool) -> ResultWriteFailed | None:
    def stop(exc: ResultWriteFailed) -> None:
        raise exc

    try:
        finisher.record(result, job, "ran", dead=dead, write_failed=stop)
    except ResultWriteFailed as exc:  # nothing else was recorded: the engine process decides (retry, or go on)
        return exc
    return None


def shareable(outcome: Any) -> Any:
    """Large arrays as tensors, which cross to the engine process in shared memory (one file descriptor passed per
    tensor); small tensors (token ids, masks, sizes) as numpy arrays, pickled inline: cheaper than a descriptor."""
    if isinstance(outcome, Loaded):
        outcome.videos = [torch.from_numpy(np.ascontiguousarray(v)) for v in outcome.videos]
    elif isinstance(outcome, Prepared):
        inputs: dict[str, Any] = dict(outcome.inputs)
        outcome.inputs = {k: v.numpy() if v.nbytes < SHARED_MIN_BYTES else v for k, v in inputs.items()}
    return outcome


def restored(outcome: Any) -> Any:
    """`shareable` undone in the engine process (no copies: `numpy` and `from_numpy` share the memory)."""
    if isinstance(outcome, Loaded):
        outcome.videos = [v.numpy() for v in outcome.videos]
    elif isinstance(outcome, Prepared):
        outcome.inputs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in outcome.inputs.items()}
    return outcome
