"""A JavaScript Celery client (celery-node 0.5.9, tests/node/submit.mjs) sends `vlmq.run` tasks to a real worker in
task protocols 1 and 2: every argument shape it can send ends in one JobResult, read the same by celery-node and by
the Python client, and the worker process stays up throughout.

celery-node's shapes: protocol 2 sends the body `[args, kwargs, {}]` with the task in the headers; protocol 1 sends
`{"task", "id", "args", "kwargs"}` in the body and no headers. `sendTask(name, args)` without kwargs sends
`kwargs: null` in protocol 2 and no `kwargs` key at all in protocol 1. The task id is sendTask's 4th argument.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from producer import Job, JobResult
from tests.conftest import MEDIA_BUCKET, Stack
from tests.reference import encode, random_image

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
SUBMIT = NODE_DIR / "submit.mjs"
RESULT_TIMEOUT_MS = 60_000
TOKENS = 4
SUCCEEDED = ("succeeded", None)
INVALID = ("failed", "invalid_job")
NO_KWARGS = object()  # the call leaves kwargs out: sendTask("vlmq.run", args)

# name -> (args, kwargs) built from the job, and the (status, error code) every protocol must end with.
SHAPES: dict[str, tuple[Callable[[dict[str, Any]], tuple[list[Any], Any]], tuple[str, str | None]]] = {
    "job": (lambda job: ([job], {}), SUCCEEDED),
    "job, kwargs null": (lambda job: ([job], None), SUCCEEDED),
    "job, kwargs not given": (lambda job: ([job], NO_KWARGS), SUCCEEDED),
    "job as kwarg": (lambda job: ([], {"job": job}), SUCCEEDED),
    "no arguments": (lambda job: ([], {}), INVALID),
    "extra argument": (lambda job: ([job, "extra"], {}), INVALID),
    "unknown kwarg": (lambda job: ([job], {"colour": "red"}), INVALID),
    "extra job field": (lambda job: ([{**job, "client_tag": "x"}], {}), INVALID),
}


def node_calls(protocol: int, uri: str) -> list[dict[str, Any]]:
    """One call per shape; each job's id is its task id (celery-node sets the task id from sendTask's 4th argument)."""
    calls = []
    for name, (build, _outcome) in SHAPES.items():
        task_id = f"node-p{protocol}-{name.replace(' ', '-').replace(',', '')}-{uuid.uuid4().hex[:8]}"
        args, kwargs = build({"id": task_id, "task": "caption", "media": [uri], "max_new_tokens": TOKENS})
        call = {"id": task_id, "args": args} if kwargs is NO_KWARGS else {"id": task_id, "args": args, "kwargs": kwargs}
        calls.append(call)
    return calls


def start_node(stack: Stack, protocol: int, calls: list[dict[str, Any]]) -> subprocess.Popen[str]:
    argv = [
        "node",
        str(SUBMIT),
        stack.redis.url,  # vlmq's result backend defaults to the broker
        stack.redis.url,
        stack.queue,
        str(protocol),
        json.dumps(calls),
        str(RESULT_TIMEOUT_MS),
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def node_lines(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """The script's output lines, once it has exited by itself (it is bounded by its own timeout)."""
    out, err = proc.communicate(timeout=RESULT_TIMEOUT_MS / 1000 + 30)
    assert proc.returncode == 0, f"node exited {proc.returncode}: {err}"
    return [json.loads(line) for line in out.splitlines()]


def test_celery_node_calls_in_both_protocols_each_end_in_one_result(stack: Stack) -> None:
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "celery-node").is_dir():
        pytest.fail("this test needs Node.js and celery-node: run `make install` (npm ci --prefix tests/node)")
    stack.s3.client().put_object(
        Bucket=MEDIA_BUCKET, Key="node/cat.png", Body=encode(random_image(40, 30, seed=1), "PNG")
    )
    uri = f"s3://{MEDIA_BUCKET}/node/cat.png"
    worker = stack.start_worker()
    client = stack.client()
    reference = client.submit(Job(task="caption", media=[uri], max_new_tokens=TOKENS)).result(timeout=120)
    assert reference.status == "succeeded"

    calls = {protocol: node_calls(protocol, uri) for protocol in (1, 2)}
    procs = {protocol: start_node(stack, protocol, calls[protocol]) for protocol in (1, 2)}
    lines = {protocol: node_lines(proc) for protocol, proc in procs.items()}

    name_of_worker = f"{socket.gethostname()}:{worker.proc.pid}"
    observed, expected = {}, {}
    deadline = time.monotonic() + 10  # node has waited for every result already: they are in Redis now
    for protocol in (1, 2):
        assert [line["call"] for line in lines[protocol]] == list(range(len(SHAPES)))
        assert [line["task_id"] for line in lines[protocol]] == [call["id"] for call in calls[protocol]]
        for (name, (_build, outcome)), line in zip(SHAPES.items(), lines[protocol], strict=True):
            task_id = line["task_id"]
            try:
                python: JobResult | None = client.result(task_id, timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                python = None
            node = JobResult.model_validate(line["result"]) if isinstance(line["result"], dict) else None
            label = f"protocol {protocol}: {name}"
            text = reference.text if outcome == SUCCEEDED else None
            observed[label] = {
                "celery-node": (line["state"], *describe(node)) if line["state"] == "SUCCESS" else line,
                "python": describe(python),
                "same result": node == python,
                "id, attempts, worker": (python.id, python.attempts, python.worker) if python else None,
            }
            expected[label] = {
                "celery-node": ("SUCCESS", *outcome, text),
                "python": (*outcome, text),
                "same result": True,
                "id, attempts, worker": (task_id, 1, name_of_worker),
            }
    for label, seen in observed.items():
        print(f"{label}: {seen}")
    assert worker.proc.poll() is None, worker.log_tail()
    wrong = [
        f"{label}:\n  got  {observed[label]}\n  want {want}"
        for label, want in expected.items()
        if observed[label] != want
    ]
    assert not wrong, f"{len(wrong)} of {len(expected)} calls:\n" + "\n".join(wrong)


def describe(result: JobResult | None) -> tuple[Any, ...]:
    """(status, error code, text) of a call's JobResult as one client read it."""
    if result is None:
        return ("no result",)
    return (result.status, result.error.code if result.error else None, result.text)
