"""What the benchmarks share: the machine description, a local Redis + SeaweedFS stack, appending to BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.devtools.local_services import RedisServer, SeaweedS3  # noqa: E402

MEDIA_BUCKET, RESULTS_BUCKET = "bench-media", "bench-results"

SIZES = [(640, 480), (480, 640), (384, 384), (1000, 200), (300, 900), (800, 600)]


def make_images(n: int) -> list[bytes]:
    """`n` random-noise JPEGs in the photo sizes of the throughput benchmark (deterministic)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def machine() -> str:
    import torch

    cores = f"{os.cpu_count()} CPU cores"
    return f"{platform.machine()}, {cores}, Python {platform.python_version()}, torch {torch.__version__}"


@dataclass
class LocalStack:
    """A redis-server and a SeaweedFS S3 server on free ports, with the media and results buckets; or, without S3,
    media as local files (`file://`, the workers allow them) and results in Redis only."""

    env: dict[str, str]
    s3: Any  # boto3 S3 client, or None
    media_dir: Path | None = None

    def upload(self, key: str, body: bytes) -> str:
        if self.media_dir is not None:
            path = self.media_dir / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            return path.as_uri()
        self.s3.put_object(Bucket=MEDIA_BUCKET, Key=key, Body=body)
        return f"s3://{MEDIA_BUCKET}/{key}"


@contextlib.contextmanager
def local_stack(work: Path, with_s3: bool = True, **env: str) -> Iterator[LocalStack]:
    """Start the services, export their settings to this process (the bench's Client), stop them at the end.
    `with_s3=False`: Redis alone (a host without SeaweedFS): media as files, results in Redis."""
    if not with_s3:
        with redis_only(work, env) as stack:
            yield stack
        return
    redis = RedisServer(work / "redis").start()
    s3 = SeaweedS3(work / "s3").start()
    try:
        for bucket in (MEDIA_BUCKET, RESULTS_BUCKET):
            s3.create_bucket(bucket)
        settings = {
            "VLMQ_BROKER_URL": redis.url,
            "VLMQ_S3_ENDPOINT_URL": s3.endpoint_url,
            "VLMQ_RESULTS_BUCKET": RESULTS_BUCKET,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            **env,
        }
        os.environ.update(settings)
        yield LocalStack(env=settings, s3=s3.client())
    finally:
        s3.stop()
        redis.stop()


@contextlib.contextmanager
def redis_only(work: Path, env: dict[str, str]) -> Iterator[LocalStack]:
    redis = RedisServer(work / "redis").start()
    try:
        settings = {"VLMQ_BROKER_URL": redis.url, "VLMQ_ALLOW_LOCAL_FILES": "1", **env}
        os.environ.update(settings)
        yield LocalStack(env=settings, s3=None, media_dir=work / "media")
    finally:
        redis.stop()


class SMSampler:
    """Mean GPU utilization (`nvidia-smi`, every 250 ms) while a measurement runs; nothing without nvidia-smi."""

    def __init__(self, work: Path) -> None:
        self.log = work / "sm.csv"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SMSampler:
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "250"]
            self.proc = subprocess.Popen(query, stdout=self.log.open("wb"), stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def mean(self) -> str:
        values = [float(v) for v in self.log.read_text().split()] if self.proc and self.log.exists() else []
        return f"{sum(values) / len(values):.0f}%" if values else "—"


def append_section(out: Path, section: str) -> None:
    if not out.exists():
        out.write_text("# Benchmarks\n\nNumbers from `bench/`; ratios are measured side by side in one run.\n")
    with out.open("a") as f:
        f.write(section)
