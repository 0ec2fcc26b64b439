"""`vlmq up`: the whole stack in one process tree. It serves jobs with the settings it prints, SIGTERM stops every
process it started, and a restart on the same data directory finds the results and the key of the last run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import psutil
import pytest

from tests.upstack import ROOT, free_up_port, start_up

SAMPLE = "s3://vlmq-media/samples/scene-00.jpg"


def vlmq(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *argv], env=env, capture_output=True, text=True, timeout=300
    )


@dataclass
class FirstRun:
    """What the first `vlmq up` left: its settings, a job's result, the processes it ran and how it ended."""

    data_dir: Path
    env: dict[str, str]
    submitted: subprocess.CompletedProcess[str]
    processes: list[psutil.Process]
    names: list[str]  # of those processes, read while they ran
    status: int


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[FirstRun]:
    data_dir = tmp_path_factory.mktemp("up") / "data"
    up = start_up(data_dir, tiny_model)
    try:
        submitted = vlmq(up.client_env(), "submit", "--wait", "-q", "--max-new-tokens", "4", SAMPLE)
        processes = psutil.Process(up.proc.pid).children(recursive=True)
        names = sorted(p.name() for p in processes)
        env = up.env()
    finally:
        status = up.stop()
    yield FirstRun(data_dir, env, submitted, processes, names, status)


def test_it_serves_jobs_with_the_settings_it_printed(first_run: FirstRun, tiny_model: Path) -> None:
    result = json.loads(first_run.submitted.stdout)
    assert (first_run.submitted.returncode, first_run.submitted.stderr) == (0, "")  # no botocore INFO line either
    assert (result["status"], result["model"], result["worker"]) == ("succeeded", str(tiny_model), "up-0")
    assert list(first_run.env) == [
        "VLMQ_BROKER_URL",
        "VLMQ_S3_ENDPOINT_URL",
        "VLMQ_RESULTS_BUCKET",
        "VLMQ_STAGING_BUCKET",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "VLMQ_API_URL",
        "VLMQ_API_KEY",
    ]


def test_sigterm_stops_every_process_it_started(first_run: FirstRun) -> None:
    left = [p for p in first_run.processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    assert first_run.status == 0
    # Redis, SeaweedFS, the API, the worker and its preprocessing process (and Python's resource tracker)
    assert [n for n in first_run.names if n in ("redis-server", "weed")] == ["redis-server", "weed"]
    assert len(first_run.names) >= 5, first_run.names
    assert left == []


def test_a_restart_finds_the_results_and_the_key_of_the_last_run(first_run: FirstRun, tiny_model: Path) -> None:
    written = json.loads(first_run.submitted.stdout)
    up = start_up(first_run.data_dir, tiny_model)
    try:
        env = up.client_env()
        read = vlmq(env, "result", written["id"])
        answer = httpx.get(
            f"{env['VLMQ_API_URL']}/jobs/{written['id']}", headers={"Authorization": f"Bearer {env['VLMQ_API_KEY']}"}
        )
        s3 = boto3.client(
            "s3",
            endpoint_url=env["VLMQ_S3_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        stored = s3.get_object(Bucket="vlmq-results", Key=f"results/{written['id']}.json")["Body"].read()
    finally:
        assert up.stop() == 0

    assert up.env()["VLMQ_API_KEY"] == first_run.env["VLMQ_API_KEY"]
    assert (read.returncode, json.loads(read.stdout)) == (0, written)  # from Redis (its append-only file)
    assert (answer.status_code, answer.json()["result"]) == (200, written)
    assert json.loads(stored) == written  # and from S3 (SeaweedFS's volumes)


def test_a_model_path_that_does_not_exist_stops_it_at_once_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    port = str(free_up_port())
    done = vlmq(env, "up", "--data-dir", str(tmp_path), "--port", port, "--model", "/a/mistyped/path")

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        "vlmq up: cannot start: --model /a/mistyped/path: no such directory. Hint: give a directory that "
        "save_pretrained or `vlmq make-tiny-model DIR` wrote, or a Hugging Face id such as "
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    ]
