"""`vlmq up`: the whole stack on one machine, in the foreground, until Ctrl-C or SIGTERM.

It starts redis-server (on port + 1) and SeaweedFS's S3 gateway (on port + 2; its master, volume and filer on free
ports) with the results and staging buckets and a few sample images, then N `vlmq worker` processes and `vlmq api`
(on port), and prints the API's URL and key and the `export` lines for `vlmq submit` and `Client.from_env()` (also
written to DATA_DIR/env). Everything lives under the data directory (default `$XDG_DATA_HOME/vlmq`, else
`~/.local/share/vlmq`): Redis's append-only file, SeaweedFS's volumes, the API key it generated, the logs; a
restart finds the results and jobs of the last run. On Ctrl-C or SIGTERM it stops the API, the workers (each
finishes its running jobs, 30 s at most), S3 and Redis, in that order, and exits 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker.devtools.local_services import (
    RedisServer,
    SeaweedS3,
    Service,
    port_free,
    spawn,
    spawn_worker,
    wait_until,
    worker_ready,
)
from worker.devtools.samples import sample_images
from worker.devtools.tiny import model_or_tiny
from worker.errors import ConfigError
from worker.preflight import check_model
from worker.settings import DEFAULT_MODEL, default_preprocess_workers
from worker.watchdog import EXIT_RESTART

DEFAULT_PORT = 8000
RESULTS_BUCKET = "vlmq-results"
STAGING_BUCKET = "vlmq-media"  # the API's uploads, data: URLs and Batch API files; and the sample images
SAMPLES = 3  # samples/scene-00.jpg (640x480), scene-01.jpg, scene-02.png
EXIT_CANNOT_START = 2
# SeaweedFS here accepts any credentials; boto3 needs some
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "vlmq",
    "AWS_SECRET_ACCESS_KEY": "vlmq-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_GRPC_OFFSET = 10000  # weed's gRPC port for its S3 gateway


class CannotStartUp(RuntimeError):
    """`vlmq up` cannot start; the message says what to do (exit status 2)."""


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/vlmq`, else `~/.local/share/vlmq`."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "vlmq"


def check_ports(port: int) -> None:
    """The API's port, Redis's (+1) and S3's (+2, and its gRPC port +10002) are free on 127.0.0.1."""
    wanted = {port: "the API", port + 1: "Redis", port + 2: "S3", port + 2 + _GRPC_OFFSET: "S3's gRPC"}
    taken = [f"{p} ({what})" for p, what in wanted.items() if not port_free(p)]
    if taken:
        raise CannotStartUp(
            f"{'ports' if len(taken) > 1 else 'port'} {', '.join(taken)} {'are' if len(taken) > 1 else 'is'} in "
            "use. Hint: stop what uses it, or choose another --port (vlmq up uses "
            f"PORT, PORT+1, PORT+2 and PORT+{_GRPC_OFFSET + 2})"
        )


@contextlib.contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Hold DATA_DIR/up.lock: one `vlmq up` per data directory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "up.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise CannotStartUp(
                f"another vlmq up (pid {lock.read().strip() or '?'}) uses {data_dir}. Hint: stop it, or give this "
                "one its own --data-dir"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def api_key(data_dir: Path) -> str:
    """The first of VLMQ_API_KEYS when set, else the key in DATA_DIR/api-key (generated on the first start)."""
    configured = os.environ.get("VLMQ_API_KEYS", "").strip().strip("[]").split(",")[0].strip().strip("\"'")
    if configured:
        return configured
    path = data_dir / "api-key"
    if not path.is_file():
        path.touch(mode=0o600)
        path.write_text(f"vlmq-{secrets.token_urlsafe(24)}\n")
    return path.read_text().strip()


def exports(port: int, host: str, key: str) -> dict[str, str]:
    """What a client of this stack needs: the VLMQ_* settings, S3 credentials, the API's URL and key."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return {
        "VLMQ_BROKER_URL": f"redis://127.0.0.1:{port + 1}/0",
        "VLMQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{port + 2}",
        "VLMQ_RESULTS_BUCKET": RESULTS_BUCKET,
        "VLMQ_STAGING_BUCKET": STAGING_BUCKET,
        **S3_CREDENTIALS,
        "VLMQ_API_URL": f"http://{shown}:{port}",
        "VLMQ_API_KEY": key,
    }


def export_lines(env: dict[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def say(message: str) -> None:
    print(f"vlmq up: {message}", file=sys.stderr, flush=True)


@dataclass
class Up:
    """The processes of one `vlmq up`, started in order and stopped in reverse."""

    data_dir: Path
    port: int
    host: str
    key: str
    model: str = ""
    services: list[Service] = field(default_factory=list)
    workers: list[Service] = field(default_factory=list)
    worker_argv: list[tuple[str, tuple[str, ...], dict[str, str]]] = field(default_factory=list)
    _storage: list[RedisServer | SeaweedS3] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return exports(self.port, self.host, self.key)

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    def start_storage(self) -> None:
        """Redis and S3 with their data in the data directory, the buckets and the sample images."""
        redis = RedisServer(self.data_dir / "redis", port=self.port + 1)
        s3 = SeaweedS3(self.data_dir / "s3", port=self.port + 2)
        for server in (redis, s3):
            self._storage.append(server)
            try:
                server.start()
            except (RuntimeError, TimeoutError) as exc:  # not installed, or exited: its log says why
                log = f" (log: {server.service.log_path})" if server.service else ""
                raise CannotStartUp(f"{exc}{log}") from None
        say(f"Redis at {redis.url} (data in {redis.workdir})")
        for bucket in (RESULTS_BUCKET, STAGING_BUCKET):
            s3.create_bucket(bucket)
        client = s3.client()
        for key, body in sample_images(SAMPLES):
            client.put_object(Bucket=STAGING_BUCKET, Key=key, Body=body)
        say(f"S3 at {s3.endpoint_url} (data in {s3.workdir}); buckets {RESULTS_BUCKET} and {STAGING_BUCKET}")

    def start_workers(self, engine: str, count: int) -> None:
        env = {**self.env, "VLMQ_PREPROCESS_WORKERS": str(default_preprocess_workers(count))}
        if count > 1:  # vLLM on CPU pins its threads to cores: several workers would pin to the same ones
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
        for i in range(count):
            self.worker_argv.append((f"worker-{i}", ("--engine", engine), {**env, "VLMQ_WORKER_NAME": f"up-{i}"}))
            self.workers.append(self._spawn_worker(i))

    def _spawn_worker(self, index: int) -> Service:
        name, args, env = self.worker_argv[index]
        worker = spawn_worker(self.model, self.logs, *args, env=env, name=name)
        self.services.append(worker)
        return worker

    def start_api(self) -> Service:
        argv = [sys.executable, "-m", "producer.cli", "api", "--host", self.host, "--port", str(self.port)]
        keys = os.environ.get("VLMQ_API_KEYS") or self.key
        env = {**os.environ, **self.env, "VLMQ_API_KEYS": keys, "PYTHONUNBUFFERED": "1"}
        api = spawn("api", argv, self.logs, env=env)
        self.services.append(api)
        return api

    def wait_ready(self, api: Service, timeout_s: float) -> None:
        """The API answers /healthz and every worker said ready; a process that exits first ends the start."""
        url = f"http://127.0.0.1:{self.port}/healthz"
        checks = [(api, lambda: urllib.request.urlopen(url, timeout=2).status == 200)]
        checks += [(w, lambda w=w: worker_ready(w)) for w in self.workers]  # type: ignore[misc]
        for service, ready in checks:
            try:
                wait_until(ready, timeout_s, service.name, service.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise CannotStartUp(self.ended(service) if service.proc.poll() is not None else str(exc)) from None

    def ended(self, service: Service) -> str:
        """What a process that exited said last (a start-up error is one line), and where its log is."""
        last = [line for line in service.log_tail(5).splitlines() if line.strip()][-1:] or ["(no output)"]
        return f"{service.name} exited with status {service.proc.returncode}: {last[0]} (log: {service.log_path})"

    def watch(self, poll_s: float = 0.5) -> str:
        """Until a process ends on its own: a worker that asks to be restarted (status 70) is; returns why."""
        while True:
            for index, worker in enumerate(self.workers):
                if worker.proc.poll() == EXIT_RESTART:
                    say(f"{worker.name} exited to be restarted (status {EXIT_RESTART}); starting it again")
                    self.services.remove(worker)
                    self.workers[index] = self._spawn_worker(index)
            for service in self.services:
                if service.proc.poll() is not None:
                    return self.ended(service)
            time.sleep(poll_s)  # between looks at the processes

    def run(self, model: str | None, engine: str, workers: int) -> int:
        """Start everything, print the banner, and watch the processes until one ends on its own (status 1)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.model = choose(model, self.data_dir)
        self.start_storage()
        say(f"starting {workers} worker{'s' if workers > 1 else ''} and the API (logs in {self.logs})")
        self.start_workers(engine, workers)
        self.wait_ready(self.start_api(), timeout_s=600)
        env_file = self.data_dir / "env"
        env_file.touch(mode=0o600)  # it holds the API key
        env_file.write_text(export_lines(self.env))
        print(banner(self, workers), flush=True)
        say(f"stopping: {self.watch()}")
        return 1

    def stop(self) -> None:
        """SIGTERM to the API and the workers together (each worker finishes its running jobs, 30 s at most, then
        SIGKILL), then S3 and Redis."""
        running = [service for service in self.services if service.proc.poll() is None]
        for service in running:
            service.proc.send_signal(signal.SIGTERM)
        for service in running:
            try:
                service.proc.wait(service.kill_after_s)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()
        for storage in reversed(self._storage):
            storage.stop()


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def choose(requested: str | None, data_dir: Path) -> str:
    """`--model` as given; without it VLMQ_MODEL or the real 0.5B model, or the tiny model when that cannot be had."""
    if requested:
        try:
            check_model(requested)
        except ConfigError as exc:
            raise CannotStartUp(str(exc)) from None
        return requested
    wanted = os.environ.get("VLMQ_MODEL") or DEFAULT_MODEL
    say(f"looking for {wanted} (a local directory, the Hugging Face cache, then the hub)")
    model, reason = model_or_tiny(wanted, data_dir)
    if reason is not None:
        say(
            f"{wanted} cannot be loaded here ({reason}); using the tiny RANDOM-WEIGHT model in {model} instead: "
            "the pipeline is real, its text is meaningless (--model or VLMQ_MODEL names a local checkpoint)"
        )
    return model


def banner(up: Up, workers: int) -> str:
    env = up.env
    return (
        f"\nvlmq is up: {workers} worker{'s' if workers > 1 else ''} serving {up.model}\n"
        f"  API       {env['VLMQ_API_URL']}  (OpenAI SDKs: base_url {env['VLMQ_API_URL']}/v1)\n"
        f"  API key   {env['VLMQ_API_KEY']}\n"
        f"  data      {up.data_dir}  (logs in {up.logs})\n"
        f"\nIn another shell, for vlmq submit, Client.from_env() and the README's examples:\n"
        f"{export_lines(env)}"
        f"(or: source {up.data_dir / 'env'})\nCtrl-C stops everything.\n"
    )


def run_up(port: int, data_dir: Path | None, model: str | None, engine: str, workers: int, host: str) -> int:
    """Start everything, print where it is, wait for Ctrl-C or SIGTERM, stop everything; the exit status."""
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts background jobs ignoring it
        signal.signal(signum, _interrupted)
    try:
        with locked(data_dir):
            check_ports(port)
            up = Up(data_dir, port, host, api_key(data_dir))
            try:
                return up.run(model, engine, workers)
            except KeyboardInterrupt:
                say("stopping (the workers finish their running jobs first)")
                return 0
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # stop everything, whatever else arrives
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                up.stop()
    except CannotStartUp as exc:
        say(f"cannot start: {exc}")
        return EXIT_CANNOT_START
    except KeyboardInterrupt:  # before anything was started
        return 0
