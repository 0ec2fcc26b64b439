"""`vlmq api` as the tests run it: a real process on a free port, configured like a deployment (VLMQ_* settings of
the test's stack), started with the worktree's code on PYTHONPATH; and a module-scoped stack for the API tests (one
queue, one worker and one API process serve every test of a module)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import RESULTS_BUCKET, Stack
from worker.devtools.local_services import RedisServer, SeaweedS3, Service, free_port, spawn, wait_until

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-1"
OTHER_KEY = "test-key-2"
STAGING_BUCKET = RESULTS_BUCKET


@dataclass
class Api:
    """A running `vlmq api` process."""

    service: Service
    port: int
    key: str | None = KEY

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = "default", timeout: float = 120) -> httpx.Client:
        """An HTTP client sending `key` (default: the API's own; None: no Authorization header)."""
        key = self.key if key == "default" else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self) -> None:
        self.service.stop()


def start_api(stack: Stack, *args: str, env: dict[str, str] | None = None, name: str = "api") -> Api:
    """Start `vlmq api` for `stack` with keys KEY and OTHER_KEY (unless `env` says otherwise); wait for /healthz."""
    port = free_port()
    settings = {
        **stack.env,
        "VLMQ_API_KEYS": f"{KEY},{OTHER_KEY}",
        "VLMQ_STAGING_BUCKET": STAGING_BUCKET,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    argv = [sys.executable, "-m", "producer.cli", "api", "--host", "127.0.0.1", "--port", str(port), *args]
    service = spawn(name, argv, stack.workdir, env={**os.environ, **settings})
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200,
            60,
            f"vlmq api ({service.log_path})",
            service.proc,
        )
    except BaseException:
        service.stop()
        raise
    return Api(service, port, key=settings["VLMQ_API_KEYS"].split(",")[0] or None)


@pytest.fixture(scope="module")
def module_stack(
    redis_server: RedisServer, s3_server: SeaweedS3, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack (queue) for a whole module: its worker and API serve every test in it."""
    stack = Stack(
        redis=redis_server,
        s3=s3_server,
        model=tiny_model,
        workdir=tmp_path_factory.mktemp("api"),
        queue=f"q-{uuid.uuid4().hex[:8]}",
    )
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({k: stack.env[k] for k in saved})  # the tests' own S3 and Client calls
    yield stack
    stack.stop_workers()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
