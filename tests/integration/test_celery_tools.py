"""Celery's own tools work against vlmq workers: `celery -A producer.celery_app inspect ...` reaches them, and the
workers send task events (what `celery events` and Flower show) without being asked to."""

from __future__ import annotations

import importlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from producer import Job
from producer.core.jobs import TASK_NAME
from tests.conftest import Stack
from tests.helpers import upload_images
from worker.app import create_app
from worker.settings import WorkerSettings

Event = dict[str, Any]


def node_name(worker_name: str) -> str:
    """The Celery node name `vlmq worker` gives itself (`--hostname=vlmq-<worker name>@%h`)."""
    return f"vlmq-{worker_name}@{socket.gethostname()}"


def celery_json(stack: Stack, *args: str) -> Any:
    """Run `celery -A producer.celery_app ARGS --json` with the stack's VLMQ_ environment; its parsed output."""
    argv = [sys.executable, "-m", "celery", "-A", "producer.celery_app", *args, "--json"]
    done = subprocess.run(
        argv, env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture
def tools_app(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Celery:
    """`producer.celery_app.app` as the `celery -A` command builds it: from the VLMQ_ environment at import."""
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    return importlib.reload(importlib.import_module("producer.celery_app")).app


def next_event(events: queue.Queue[Event], wanted: Callable[[Event], bool], timeout_s: float = 120) -> Event:
    """The first event that is `wanted`; the ones before it are dropped."""
    deadline = time.monotonic() + timeout_s
    seen: Counter[str] = Counter()
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = events.get(timeout=left)
        except queue.Empty:
            break
        if wanted(event):
            return event
        seen[event["type"]] += 1
    raise AssertionError(f"no such event within {timeout_s} s; saw {dict(seen)}")


@pytest.fixture
def captured(tools_app: Celery) -> Iterator[queue.Queue[Event]]:
    """Every event on the broker from now on, as `celery events` receives them."""
    events: queue.Queue[Event] = queue.Queue()
    with tools_app.connection_for_read() as connection:
        receiver = tools_app.events.Receiver(connection, handlers={"*": events.put})
        capture = threading.Thread(target=receiver.capture, kwargs={"wakeup": True}, daemon=True)
        capture.start()
        yield events
        receiver.should_stop = True  # the receiver checks this every second
        capture.join(30)


def test_celery_inspect_reaches_the_worker_by_its_node_name_with_its_queues(stack: Stack) -> None:
    worker = stack.start_worker("--concurrency", "3", env={"VLMQ_WORKER_NAME": f"tools-{stack.queue}"})
    node = node_name(f"tools-{stack.queue}")

    # With a destination, inspect returns as soon as that node answers (the timeout only bounds a silent one).
    assert celery_json(stack, "inspect", "ping", "--destination", node, "--timeout", "60") == {node: {"ok": "pong"}}
    active_queues = celery_json(stack, "inspect", "active_queues", "--destination", node, "--timeout", "60")
    assert [q["name"] for q in active_queues[node]] == [f"{stack.queue}-interactive", stack.queue]
    stats = celery_json(stack, "inspect", "stats", "--destination", node, "--timeout", "60")
    assert stats[node]["pid"] == worker.proc.pid
    assert stats[node]["pool"]["max-concurrency"] == 3


def test_workers_send_task_events_without_being_asked(stack: Stack, captured: queue.Queue[Event]) -> None:
    stack.start_worker(env={"VLMQ_WORKER_NAME": f"events-{stack.queue}"})
    node = node_name(f"events-{stack.queue}")
    # Redis subscribes the receiver on its first read: once a heartbeat of the worker arrives, nothing is missed.
    next_event(captured, lambda e: e["type"] == "worker-heartbeat" and e["hostname"] == node)

    job = Job(media=upload_images(stack, "events", 1), max_new_tokens=4)
    assert stack.client().submit(job).result(timeout=120).ok

    task_events = []
    while not task_events or task_events[-1]["type"] != "task-succeeded":
        # The result is stored before task-succeeded is sent, so it may still be on its way.
        task_events.append(next_event(captured, lambda e: e.get("uuid") == job.id, timeout_s=30))
    assert [e["type"] for e in task_events] == ["task-received", "task-started", "task-succeeded"]
    assert {e["hostname"] for e in task_events} == {node}
    assert task_events[0]["name"] == TASK_NAME


def test_vlmq_task_events_false_turns_task_events_off() -> None:
    assert create_app(WorkerSettings(task_events=True)).conf.worker_send_task_events is True
    assert create_app(WorkerSettings(task_events=False)).conf.worker_send_task_events is False
