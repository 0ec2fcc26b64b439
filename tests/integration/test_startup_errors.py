"""Start-up mistakes end `vlmq worker` and `vlmq api` with one line that says what is wrong and what to do, and exit
status 2 (which the `--gpus` supervisor does not restart): real processes, real Redis and SeaweedFS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import Stack
from worker.devtools.local_services import free_port
from worker.settings import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]
HINT = "Hint: give a directory that save_pretrained or `vlmq make-tiny-model DIR` wrote, or a Hugging Face id"


def vlmq(stack: Stack, *argv: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `vlmq ARGV` with the stack's settings; its exit status and every line it printed (stdout and stderr)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    settings = {**os.environ, **stack.env, "PYTHONPATH": path, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", *argv],
        env=settings,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout.splitlines()


def test_a_model_path_that_does_not_exist(stack: Stack) -> None:
    assert vlmq(stack, "worker", "--device", "cpu", "--model", "/a/mistyped/path") == (
        2,
        [f"vlmq worker: cannot start: --model /a/mistyped/path: no such directory. {HINT} such as {DEFAULT_MODEL}"],
    )


def test_a_directory_that_is_not_a_checkpoint(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"not a checkpoint")
    assert vlmq(stack, "worker", "--device", "cpu", "--model", str(tmp_path)) == (
        2,
        [
            f"vlmq worker: cannot start: --model {tmp_path} is a directory but not a checkpoint: it has no "
            f"config.json. {HINT}"
        ],
    )


def test_a_results_bucket_that_does_not_exist(stack: Stack) -> None:
    status, lines = vlmq(
        stack, "worker", "--device", "cpu", "--model", str(stack.model), env={"VLMQ_RESULTS_BUCKET": "no-such-bucket"}
    )
    assert (status, lines) == (
        2,
        [
            "vlmq worker: cannot start: the bucket 'no-such-bucket' (VLMQ_RESULTS_BUCKET) does not exist at "
            f"{stack.s3.endpoint_url}. Hint: create it (aws s3 mb s3://no-such-bucket --endpoint-url "
            f"{stack.s3.endpoint_url}), or set VLMQ_RESULTS_BUCKET to a bucket that exists"
        ],
    )


def test_a_broker_that_does_not_answer_within_the_timeout(stack: Stack) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = {"VLMQ_BROKER_URL": dead, "VLMQ_BROKER_CONNECT_TIMEOUT_S": "1.5"}
    status, lines = vlmq(stack, "worker", "--device", "cpu", "--model", str(stack.model), env=env)
    port = dead.split(":")[2].split("/")[0]
    assert (status, lines) == (
        2,
        [
            f"vlmq worker: cannot start: the broker at {dead} (VLMQ_BROKER_URL) did not answer within 1.5 s: Error 111 "
            f"connecting to 127.0.0.1:{port}. Connection refused. Hint: start Redis or fix the URL; "
            "VLMQ_BROKER_CONNECT_TIMEOUT_S sets how long to wait"
        ],
    )


def test_the_api_refuses_a_staging_bucket_that_does_not_exist(stack: Stack) -> None:
    env = {"VLMQ_API_KEYS": "k", "VLMQ_STAGING_BUCKET": "no-staging"}
    status, lines = vlmq(stack, "api", "--host", "127.0.0.1", "--port", str(free_port()), env=env)
    assert (status, lines) == (
        2,
        [
            "vlmq api: cannot start: the bucket 'no-staging' (VLMQ_STAGING_BUCKET) does not exist at "
            f"{stack.s3.endpoint_url}. Hint: create it (aws s3 mb s3://no-staging --endpoint-url "
            f"{stack.s3.endpoint_url}), or set VLMQ_STAGING_BUCKET to a bucket that exists"
        ],
    )


def test_a_checkpoint_the_engine_cannot_load(stack: Stack, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(stack.model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    status, lines = vlmq(stack, "worker", "--device", "cpu", "--preprocess-workers", "0", "--model", str(broken))

    assert status == 2
    assert [line for line in lines if "Traceback" in line] == []
    assert lines[-1].startswith(f"vlmq worker: cannot start: the model {broken} could not be loaded: "), lines[-1]
    assert lines[-1].endswith(" (`vlmq -v worker ...` shows the traceback)")


def test_a_setting_out_of_range_names_where_it_came_from(stack: Stack) -> None:
    """One line per command (the worker, the API, a client command), naming the flag or the environment variable
    that set each wrong value."""
    worker = vlmq(stack, "worker", "--model", str(stack.model), "--max-batch-size", "0", "--device", "tpu",
                  env={"VLMQ_MAX_WAIT_MS": "-5"})  # fmt: skip
    api = vlmq(stack, "api", env={"VLMQ_VISIBILITY_TIMEOUT_S": "0"})
    result = vlmq(stack, "result", "some-id", env={"VLMQ_VISIBILITY_TIMEOUT_S": "0"})

    assert worker == (
        2,
        [
            "vlmq worker: invalid settings: --device=tpu: device 'tpu' is not auto, cpu, cuda or cuda:N. "
            "Hint: --device cuda:0; --max-batch-size=0: must be greater than or equal to 1; "
            "VLMQ_MAX_WAIT_MS=-5: must be greater than or equal to 0"
        ],
    )
    assert api == (2, ["vlmq api: invalid settings: VLMQ_VISIBILITY_TIMEOUT_S=0: must be greater than or equal to 1"])
    assert result == (
        2,
        ["vlmq result: invalid settings: VLMQ_VISIBILITY_TIMEOUT_S=0: must be greater than or equal to 1"],
    )
