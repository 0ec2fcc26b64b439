"""`vlmq up` as the tests run it: a real process on free ports with its own data directory, the worktree's code on
PYTHONPATH, the tiny model; ready once it has printed its `export` lines."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from worker.devtools.local_services import free_port, port_free, wait_until

ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "Ctrl-C stops everything."


def free_up_port() -> int:
    """A port for `vlmq up --port`: it, +1 (Redis), +2 (S3) and +10002 (S3's gRPC) free, all below 45000."""
    while True:
        port = free_port()
        if port < 34000 and all(port_free(p) for p in (port + 1, port + 2, port + 10002)):
            return port


@dataclass
class Up:
    """A running `vlmq up`."""

    proc: subprocess.Popen[bytes]
    data_dir: Path
    port: int
    out: Path
    err: Path

    def env(self) -> dict[str, str]:
        """The settings it wrote to DATA_DIR/env (`export NAME=VALUE` lines)."""
        lines = (self.data_dir / "env").read_text().splitlines()
        return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines)

    def client_env(self) -> dict[str, str]:
        """This process's environment with the stack's settings: what a shell that sourced DATA_DIR/env has."""
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return {**os.environ, **self.env(), "PYTHONPATH": path}

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout_s)


def start_up(data_dir: Path, model: Path, *args: str, timeout_s: float = 300) -> Up:
    """`vlmq up --port P --data-dir DATA_DIR --model MODEL ARGS...`, waited for until it is ready."""
    port = free_up_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    run = len(list(data_dir.parent.glob(f"{data_dir.name}-up-*.out")))  # each start its own output files
    out, err = (data_dir.parent / f"{data_dir.name}-up-{run}.{kind}" for kind in ("out", "err"))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "producer.cli", "up", "--port", str(port), "--data-dir", str(data_dir)]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [*argv, "--model", str(model), *args],
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": path},
        )
    up = Up(proc, data_dir, port, out, err)
    try:
        wait_until(lambda: READY_LINE in out.read_text(), timeout_s, f"vlmq up ({err})", proc)
    except BaseException:
        up.stop(signal.SIGKILL)
        raise
    return up
