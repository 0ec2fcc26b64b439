"""The no-op engine (worker/devtools/noop_engine.py), the seam bench/overhead.py measures the worker through."""

from __future__ import annotations

import json

from producer import Job
from tests.conftest import Stack
from tests.helpers import upload_images


def test_a_worker_with_the_noop_engine_answers_every_job_with_its_fixed_text(stack: Stack) -> None:
    uris = upload_images(stack, "noop", 2)
    worker = stack.start_worker(env={"VLMQ_FAULTS": json.dumps({"noop_engine": "fixed text"})})
    client = stack.client()
    results = client.run([Job(media=[u], prompt="Describe this image.") for u in uris], progress=False, timeout=60)
    assert [(r.status, r.text, r.batch_size) for r in results] == [("succeeded", "fixed text", 1)] * 2
    assert "engine: noop" in worker.log_path.read_text()
