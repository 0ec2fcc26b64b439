"""Priorities: a single interactive job overtakes a queued backfill (workers serve the interactive queue first)."""

from __future__ import annotations

import re

from producer import Job
from tests.conftest import Stack
from tests.helpers import upload_images
from worker.devtools.local_services import wait_until

BATCH = 4


def test_an_interactive_job_finishes_within_a_few_batches_while_a_backfill_is_queued(stack: Stack) -> None:
    uris = upload_images(stack, "priority", 10)
    worker = stack.start_worker("--max-batch-size", str(BATCH), "--max-wait-ms", "20")
    client = stack.client()
    backfill = [client.submit(Job(media=[uris[i % 10]], max_new_tokens=2), priority="bulk").id for i in range(500)]

    def finished_lines() -> list[str]:
        return re.findall(r"job (\S+) finished: ", worker.log_path.read_text())

    wait_until(lambda: len(finished_lines()) >= 20, 120, "20 backfill jobs", worker.proc)
    before = len(finished_lines())
    interactive = client.submit(Job(media=[uris[0]], max_new_tokens=2))
    result = interactive.result(timeout=120)

    order = finished_lines()
    overtaken_by = order.index(interactive.id) - before  # backfill jobs that finished after it was sent, before it
    print(f"\npriority: 500 queued backfill jobs; the interactive job finished after {overtaken_by} more of them")
    assert result.ok and interactive.id not in backfill
    assert overtaken_by <= 4 * BATCH  # the jobs already in flight (2 x batch), and at most two more batches
    assert len(order) < 250  # most of the backfill was still waiting
