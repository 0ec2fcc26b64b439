"""Shared fixtures: a tiny model, and for integration tests a real redis-server, SeaweedFS and worker processes."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from worker.devtools.local_services import RedisServer, SeaweedS3, Service, start_worker

MEDIA_BUCKET = "vlmq-test-media"
RESULTS_BUCKET = "vlmq-test-results"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by directory: tests/integration -> integration, tests/gpu -> gpu (skipped without CUDA); and slow,
    every test that loads a model (it asks for the tiny checkpoint) or runs real services (`make test-fast` runs the
    others)."""
    cuda = None
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts or "gpu" in parts or "tiny_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "gpu" in parts:
            item.add_marker(pytest.mark.gpu)
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda and os.environ.get("VLMQ_GPU_TESTS_ON_CPU") != "1":  # the rehearsal: tests/gpu's docstring
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.devtools.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        for bucket in (MEDIA_BUCKET, RESULTS_BUCKET):
            server.create_bucket(bucket)
        yield server
    finally:
        server.stop()


@dataclass
class Stack:
    """Environment of one test's producer and workers: its own queue on the shared Redis and S3."""

    redis: RedisServer
    s3: SeaweedS3 | None  # None: Redis alone (tests/gpu, as on a GPU host without SeaweedFS)
    model: Path
    workdir: Path
    queue: str = field(default_factory=lambda: f"q-{uuid.uuid4().hex[:8]}")
    workers: list[Service] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {
            "VLMQ_BROKER_URL": self.redis.url,
            "VLMQ_QUEUE": self.queue,
            "VLMQ_INTERACTIVE_QUEUE": f"{self.queue}-interactive",
            "AWS_ACCESS_KEY_ID": "vlmq",
            "AWS_SECRET_ACCESS_KEY": "vlmq-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        if self.s3 is None:  # media as local files, results in Redis
            return {**env, "VLMQ_ALLOW_LOCAL_FILES": "1"}
        return {**env, "VLMQ_S3_ENDPOINT_URL": self.s3.endpoint_url, "VLMQ_RESULTS_BUCKET": RESULTS_BUCKET}

    def client(self):  # -> producer.Client
        from producer import Client, ClientSettings

        return Client(
            ClientSettings(
                broker_url=self.redis.url,
                s3_endpoint_url=self.s3.endpoint_url if self.s3 else None,
                results_bucket=RESULTS_BUCKET if self.s3 else None,
                queue=self.queue,
                interactive_queue=f"{self.queue}-interactive",
            )
        )

    def put_media(self, key: str, body: bytes) -> str:
        """Store a media object where workers read it: the media bucket, or a file without S3; its URI."""
        if self.s3 is None:
            path = self.workdir / "media" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            return path.as_uri()
        self.s3.client().put_object(Bucket=MEDIA_BUCKET, Key=key, Body=body)
        return f"s3://{MEDIA_BUCKET}/{key}"

    def start_worker(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        ready_count: int = 1,
        python: str | Path = sys.executable,
        timeout_s: float = 120,
    ) -> Service:
        """Start `vlmq worker` on the tiny model (CPU), with extra `VLMQ_` settings, and wait until it is ready
        (`ready_count=0`: do not wait). `python`: the interpreter, e.g. the vLLM environment's."""
        name = f"worker-{len(self.workers)}"
        env = {**self.env, **(env or {})}
        worker = start_worker(
            self.model,
            self.workdir,
            "--device",
            "cpu",
            *args,
            env=env,
            name=name,
            ready_count=ready_count,
            python=python,
            timeout_s=timeout_s,
        )
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def stack(
    redis_server: RedisServer, s3_server: SeaweedS3, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    s = Stack(redis=redis_server, s3=s3_server, model=tiny_model, workdir=tmp_path)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, s.env[name])  # the test's own Client reads S3 too
    yield s
    s.stop_workers()
