"""`vlmq worker --gpus 0,1,2,3` (or `all`): one worker process per GPU under one supervisor.

Each child is a plain `vlmq worker` that sees only its own GPU (`CUDA_VISIBLE_DEVICES`), so CUDA never crosses a
fork and a broken device takes down one child, not its neighbours. A child that exits is started again (after 1 s,
doubling up to 60 s while it keeps dying young); its unfinished jobs come back through Redis. SIGTERM or SIGINT
is passed on to every child (each finishes its running jobs) and the supervisor exits when they have.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from worker.settings import default_preprocess_workers

log = logging.getLogger(__name__)

# `vlmq worker` exits 2 when its settings cannot work on this machine (invalid, or a ConfigError at start-up).
EXIT_CANNOT_START = 2
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long before exiting is restarted without delay growth


def parse_gpus(spec: str) -> list[str]:
    # "all" counts the devices torch sees, i.e. within CUDA_VISIBLE_DEVICES.
    """`0,1,3` -> ["0", "1", "3"]; `all` -> every CUDA device torch sees."""
    if spec.strip() == "all":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("--gpus all: no CUDA device is visible. Hint: check nvidia-smi, or use --device cpu")
        return [str(i) for i in range(count)]
    gpus = [part.strip() for part in spec.split(",") if part.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {spec!r}: give distinct GPU indices like 0,1,2,3, or all")
    return gpus


@dataclass
class Child:
    gpu: str
    proc: subprocess.Popen[bytes]
    started: float
    backoff_s: float = MIN_BACKOFF_S
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Starts `argv` once per GPU and keeps each running."""

    gpus: Sequence[str]
    argv: Sequence[str]  # `vlmq worker` flags, without --gpus
    metrics_port: int | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    children: dict[str, Child] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    status: int = 0

    def child_env(self, index: int, gpu: str) -> dict[str, str]:
        # GPU numbers count within what this process may see: with CUDA_VISIBLE_DEVICES=2,3 (Slurm, shared hosts),
        # GPU 0 is physical device 2.
        visible = [d.strip() for d in self.env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        device = visible[int(gpu)] if visible and int(gpu) < len(visible) else gpu
        env = {**self.env, "CUDA_VISIBLE_DEVICES": device}
        if env.get("VLMQ_DEVICE", "auto").startswith("cuda"):
            env["VLMQ_DEVICE"] = "cuda:0"  # each child sees one GPU
        # One name per child: Celery node names (vlmq-<name>@host) must differ, or the workers would answer for
        # one another in `celery inspect` and Flower. A name given for the host gets the GPU appended.
        env["VLMQ_WORKER_NAME"] = f"{self.env.get('VLMQ_WORKER_NAME') or socket.gethostname()}:gpu{gpu}"
        # The host's cores shared out: each GPU's worker gets its share minus its engine's core for preprocessing.
        env.setdefault("VLMQ_PREPROCESS_WORKERS", str(default_preprocess_workers(len(self.gpus))))
        if self.metrics_port:
            env["VLMQ_METRICS_PORT"] = str(self.metrics_port + index)
        return env

    def spawn(self, index: int, gpu: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "producer.cli", "worker", *self.argv]
        proc = subprocess.Popen(command, env=self.child_env(index, gpu))
        log.info("started the worker for GPU %s (pid %d)", gpu, proc.pid)
        return proc

    def run(self, poll_s: float = 0.5) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        for index, gpu in enumerate(self.gpus):
            self.children[gpu] = Child(gpu, self.spawn(index, gpu), time.monotonic())
        while not self._stopping.wait(poll_s):
            for index, gpu in enumerate(self.gpus):
                self._tend(index, self.children[gpu])
        return self._stop_all()

    def _tend(self, index: int, child: Child) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.proc, child.started, child.restart_at = self.spawn(index, child.gpu), now, None
            return
        status = child.proc.poll()
        if status is None:
            return
        if status == EXIT_CANNOT_START:  # settings that cannot work here: a restart would fail the same way
            log.error("the worker for GPU %s cannot start with these settings (see its message); stopping", child.gpu)
            self.status = EXIT_CANNOT_START
            self._stopping.set()
            return
        if now - child.started >= HEALTHY_AFTER_S:
            child.backoff_s = MIN_BACKOFF_S
        log.warning(
            "the worker for GPU %s (pid %d) exited with status %d; restarting it in %.0f s",
            child.gpu,
            child.proc.pid,
            status,
            child.backoff_s,
        )
        child.restart_at = now + child.backoff_s
        child.backoff_s = min(MAX_BACKOFF_S, child.backoff_s * 2)

    def _stop_all(self) -> int:
        log.info("stopping: each worker finishes its running jobs first")
        running = [c.proc for c in self.children.values() if c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            proc.wait()
        return self.status
