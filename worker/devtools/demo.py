"""`vlmq demo`: the whole system on one machine, end to end.

Starts what is not configured (a local redis-server, a SeaweedFS S3 server), uploads generated sample images,
starts a `vlmq worker`, submits caption and QA jobs through `producer.Client` with a progress bar, prints the
results as a table, and stops what it started. It uses the real model when it can be loaded, and otherwise a
tiny random-weight model, saying so.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from producer.client import Client
from producer.core.jobs import Generation, Job, JobResult
from worker.devtools.local_services import RedisServer, SeaweedS3, Service, start_worker
from worker.devtools.samples import sample_images
from worker.devtools.tiny import model_or_tiny
from worker.settings import DEFAULT_MODEL

MEDIA_BUCKET = "vlmq-demo"
RESULTS_BUCKET = "vlmq-demo-results"
QUESTIONS = ["What shapes are in this picture?", "What is the main colour?", "Is there a circle?"]
console = Console(stderr=True)


def choose_model(requested: str, workdir: Path) -> tuple[str, bool]:
    """The requested model if its files can be had (cache or hub), else a freshly written tiny model."""
    with console.status(f"looking for {requested} (cache, then the Hugging Face Hub)"):
        model, reason = model_or_tiny(requested, workdir)
    if reason is not None:
        console.print(
            f"[bold yellow]Could not load {requested}[/] ({reason}).\n"
            "[bold yellow]Using a tiny RANDOM-WEIGHT LLaVA-OneVision model instead: the pipeline is real, "
            "the captions are meaningless.[/] Set VLMQ_MODEL to a local checkpoint to see real text."
        )
    return model, reason is not None


@contextlib.contextmanager
def local_stack(workdir: Path) -> Iterator[dict[str, str]]:
    """Yield VLMQ_* settings for Redis and S3, starting local servers for whatever is not configured."""
    env: dict[str, str] = {}
    started: list[RedisServer | SeaweedS3] = []
    try:
        if os.environ.get("VLMQ_BROKER_URL"):
            env["VLMQ_BROKER_URL"] = os.environ["VLMQ_BROKER_URL"]
        else:
            with console.status("starting redis-server"):
                redis = RedisServer(workdir / "redis").start()
            started.append(redis)
            env["VLMQ_BROKER_URL"] = redis.url
            console.print(f"started redis-server at {redis.url}")
        if os.environ.get("VLMQ_S3_ENDPOINT_URL") or os.environ.get("VLMQ_RESULTS_BUCKET"):
            env["VLMQ_RESULTS_BUCKET"] = os.environ.get("VLMQ_RESULTS_BUCKET", RESULTS_BUCKET)
            if os.environ.get("VLMQ_S3_ENDPOINT_URL"):
                env["VLMQ_S3_ENDPOINT_URL"] = os.environ["VLMQ_S3_ENDPOINT_URL"]
        else:
            with console.status("starting SeaweedFS (S3)"):
                s3 = SeaweedS3(workdir / "seaweedfs").start()
            started.append(s3)
            for bucket in (MEDIA_BUCKET, RESULTS_BUCKET):
                s3.create_bucket(bucket)
            env.update(VLMQ_S3_ENDPOINT_URL=s3.endpoint_url, VLMQ_RESULTS_BUCKET=RESULTS_BUCKET)
            env.setdefault("AWS_ACCESS_KEY_ID", os.environ.get("AWS_ACCESS_KEY_ID", "vlmq"))
            env.setdefault("AWS_SECRET_ACCESS_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY", "vlmq-secret"))
            env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            console.print(f"started SeaweedFS S3 at {s3.endpoint_url}")
        yield env
    finally:
        for service in reversed(started):
            service.stop()


def _printable(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def results_table(jobs: list[Job], results: list[JobResult]) -> Table:
    table = Table(title="vlmq demo results")
    for column in ("job", "media", "task", "status", "batch", "fetch ms", "infer ms"):
        table.add_column(column, no_wrap=True, min_width=len(column) if column != "status" else 9)
    table.add_column("text / error", no_wrap=True, overflow="ellipsis", max_width=50)
    for job, r in zip(jobs, results, strict=True):
        what = r.text if r.ok else f"{r.error.code}: {r.error.message}" if r.error else ""
        table.add_row(
            r.id[:8],
            job.media[0].uri.rsplit("/", 1)[-1],
            job.task,
            "[green]succeeded[/]" if r.ok else "[red]failed[/]",
            str(r.batch_size or ""),
            f"{r.timings.fetch:.0f}",
            f"{r.timings.infer:.0f}",
            _printable(what or ""),
        )
    return table


def run_demo(jobs: int = 12, model: str | None = None, max_batch_size: int = 8) -> int:
    """Run the demo; returns the process exit code."""
    requested = model or os.environ.get("VLMQ_MODEL") or DEFAULT_MODEL
    with tempfile.TemporaryDirectory(prefix="vlmq-demo-") as tmp:
        workdir = Path(tmp)
        model_path, tiny = choose_model(requested, workdir)
        with local_stack(workdir) as env:
            os.environ.update(env)
            client = Client.from_env()
            s3 = client.s3
            uris = []
            for key, body in sample_images(jobs):
                s3.put_object(Bucket=MEDIA_BUCKET, Key=key, Body=body)
                uris.append(f"s3://{MEDIA_BUCKET}/{key}")
            s3.put_object(Bucket=MEDIA_BUCKET, Key="samples/not-an-image.jpg", Body=b"this is text, not a JPEG")
            console.print(
                f"uploaded {len(uris) + 1} sample objects to s3://{MEDIA_BUCKET}/samples/ (one is not an image)"
            )

            worker: Service | None = None
            try:
                with console.status(f"starting a worker with {'the tiny model' if tiny else model_path}"):
                    args = ("--max-batch-size", str(max_batch_size))
                    worker = start_worker(model_path, workdir, *args, env=env, timeout_s=600)
                short = Generation(max_new_tokens=24)
                batch = [
                    Job(task="qa", media=[uri], question=QUESTIONS[i % len(QUESTIONS)], generation=short)
                    if i % 2
                    else Job(task="caption", media=[uri], generation=short)
                    for i, uri in enumerate(uris)
                ]
                batch.append(Job(task="caption", media=[f"s3://{MEDIA_BUCKET}/samples/not-an-image.jpg"]))
                started = time.perf_counter()
                results = client.run(batch, progress=True, timeout=900)
                elapsed = time.perf_counter() - started
            except Exception:
                console.print("[red]the demo failed; the worker's log ends with:[/]")
                console.print((workdir / "worker.log").read_text(errors="replace")[-3000:])
                raise
            finally:
                if worker is not None:
                    worker.stop()
            Console(width=max(Console().width, 140)).print(results_table(batch, results))
            ok = sum(r.ok for r in results)
            console.print(
                f"{ok} of {len(results)} jobs succeeded in {elapsed:.1f} s; results are in Redis and in "
                f"s3://{env['VLMQ_RESULTS_BUCKET']}/results/<job id>.json"
                + (" (tiny random model: meaningless text)" if tiny else "")
            )
            expected_failures = 1  # not-an-image.jpg
            return 0 if ok == len(results) - expected_failures else 1
