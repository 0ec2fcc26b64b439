"""The chaos test's machinery (tests/integration/test_chaos.py): a seeded schedule of faults, the workers it strikes
and restarts as a supervisor (systemd, Kubernetes) would, and the services it takes down and brings back."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from tests.conftest import Stack
from worker.devtools.local_services import RedisServer, SeaweedS3, Service

SEED = int(os.environ.get("VLMQ_CHAOS_SEED", "20261204"))
S3_OUTAGE_S = 30.0
STALL_S = 10.0  # shorter than the visibility timeout: a stalled worker's jobs are not delivered twice meanwhile


@dataclass(frozen=True)
class Fault:
    """One fault of the schedule: what, and when (seconds after the jobs were sent)."""

    kind: str
    at_s: float
    target: int  # which worker (0..workers-1), where the fault strikes one


KINDS = ("kill-worker", "kill-worker", "kill-worker", "kill-preprocess", "restart-redis", "s3-outage",
         "kill-engine", "stall-consumer")  # fmt: skip


def schedule(seed: int, window_s: float, workers: int) -> list[Fault]:
    """Every fault once (a worker SIGKILLed three times), at seeded times within `window_s`, so that they overlap:
    the S3 outage alone spans a third of the window."""
    rng = random.Random(seed)
    faults = [Fault(kind, round(rng.uniform(3, window_s), 1), rng.randrange(workers)) for kind in KINDS]
    return sorted(faults, key=lambda f: f.at_s)


@dataclass
class Chaos:
    """The workers of one run (kept at `workers`, restarted when one dies) and the faults applied to them."""

    stack: Stack
    redis: RedisServer
    s3: SeaweedS3
    start: Callable[[], Service]
    workers: int
    slots: list[Service] = field(default_factory=list)
    restarts: int = 0
    applied: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self) -> None:
        self.slots = [self.start() for _ in range(self.workers)]
        threading.Thread(target=self._supervise, name="chaos-supervisor", daemon=True).start()

    def _supervise(self) -> None:
        """Start a new worker in the place of any that exited (killed, or refusing to start while S3 is down)."""
        while not self._stop.wait(0.2):
            with self._lock:
                for i, worker in enumerate(self.slots):
                    if worker.proc.poll() is not None:
                        self.slots[i] = self.start()
                        self.restarts += 1

    def stop(self) -> None:
        self._stop.set()
        for worker in self.stack.workers:
            _kill_group(worker)

    def run(self, faults: list[Fault], started: float) -> list[threading.Thread]:
        """Apply each fault at its time, each in its own thread (they overlap); returns the threads."""
        threads = []
        for fault in faults:
            thread = threading.Thread(target=self._at, args=(fault, started), name=f"chaos-{fault.kind}", daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def _at(self, fault: Fault, started: float) -> None:
        time.sleep(max(0.0, started + fault.at_s - time.monotonic()))
        with self._lock:
            worker = self.slots[fault.target]
        try:
            did = getattr(self, "_" + fault.kind.replace("-", "_"))(worker)
        except ProcessLookupError:  # the worker died meanwhile (another fault): nothing to do to it
            did = f"worker pid {worker.proc.pid} had already exited"
        self.applied.append(f"{fault.at_s:6.1f} s  {fault.kind}: {did} (until {time.monotonic() - started:.1f} s)")

    def _kill_worker(self, worker: Service) -> str:
        _kill_group(worker)
        return f"worker pid {worker.proc.pid} and its preprocessing processes SIGKILLed"

    def _kill_engine(self, worker: Service) -> str:
        os.kill(worker.proc.pid, signal.SIGKILL)  # the model's process alone; its preprocessing processes see it go
        return f"worker pid {worker.proc.pid} (the engine's process) SIGKILLed"

    def _kill_preprocess(self, worker: Service) -> str:
        children = [c for c in _children(worker) if "multiprocessing" in " ".join(c.cmdline())]
        if not children:
            return "no preprocessing process to kill (the worker was starting)"
        children[0].kill()
        return f"preprocessing process {children[0].pid} of worker pid {worker.proc.pid} SIGKILLed"

    def _stall_consumer(self, worker: Service) -> str:
        os.kill(worker.proc.pid, signal.SIGSTOP)
        time.sleep(STALL_S)
        try:
            os.kill(worker.proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            return f"worker pid {worker.proc.pid} stopped (SIGSTOP), then SIGKILLed by another fault while stopped"
        return f"worker pid {worker.proc.pid} stopped for {STALL_S:g} s (SIGSTOP), then continued"

    def _restart_redis(self, worker: Service) -> str:
        down = time.monotonic()
        self.redis.restart()
        return f"Redis restarted (down {time.monotonic() - down:.1f} s)"

    def _s3_outage(self, worker: Service) -> str:
        self.s3.stop()
        time.sleep(S3_OUTAGE_S)
        self.s3.start()
        return f"S3 down for {S3_OUTAGE_S:g} s"


def _children(worker: Service) -> list[psutil.Process]:
    try:
        return psutil.Process(worker.proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_group(worker: Service) -> None:
    for process in _children(worker):
        with contextlib.suppress(psutil.Error):
            process.kill()
    with contextlib.suppress(OSError):
        os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
