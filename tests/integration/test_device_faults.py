"""Device faults and deadlines in real worker processes: OOM splitting, a sticky CUDA error, a hung batch, a hung
decoder, expired jobs and a SIGTERM drain. Faults are injected with VLMQ_FAULTS (worker/devtools/faults.py)."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta

import pytest

from producer import Job
from tests.conftest import Stack
from tests.helpers import FAST_REDELIVERY, LONG_QUESTION, OVER_TOKENS, count_in_logs, hanging_video, upload_images
from tests.reference import random_image, reference_text
from worker.watchdog import EXIT_RESTART


def test_out_of_memory_splits_the_batch_and_only_the_item_too_large_alone_fails(stack: Stack) -> None:
    uris = upload_images(stack, "oom", 6)
    faults = {"oom_above_batch": 2, "oom_over_tokens": OVER_TOKENS}
    stack.start_worker("--max-batch-size", "4", "--max-wait-ms", "500", env={"VLMQ_FAULTS": json.dumps(faults)})
    client = stack.client()
    small = [Job(media=[u], max_new_tokens=6) for u in uris]
    too_large = Job(task="qa", media=[uris[0]], question=LONG_QUESTION, max_new_tokens=6)
    results = client.run([*small[:3], too_large, *small[3:]], progress=False, timeout=180)

    splits = sum(count_in_logs(stack, r"out of memory on a batch of (\d+)").values())
    print(f"\ninjected OOM: {len(results)} jobs, {splits} batches split, 1 item too large alone")
    assert splits >= 1
    by_id = {r.id: r for r in results}
    failed = by_id[too_large.id]
    assert (failed.status, failed.error and failed.error.code) == ("failed", "out_of_memory")
    for i, job in enumerate(small):
        result = by_id[job.id]
        assert result.status == "succeeded" and result.batch_size is not None and result.batch_size <= 2
        image = random_image(40, 30, seed=i)
        assert result.text == reference_text(stack.model, [image], "Describe this image in detail.", 6)


@pytest.mark.parametrize(
    ("fault", "env", "logged"),
    [
        ("device_error_over_tokens", {}, "the device failed"),
        ("hang_over_tokens", {"VLMQ_BATCH_TIMEOUT_S": "3"}, "a batch has run for more than 3 s"),
    ],
)
def test_a_broken_or_hung_device_exits_the_worker_and_its_jobs_run_on_the_next(
    stack: Stack, fault: str, env: dict[str, str], logged: str
) -> None:
    uris = upload_images(stack, "device", 3)
    faulty = {**FAST_REDELIVERY, **env, "VLMQ_FAULTS": json.dumps({fault: OVER_TOKENS})}
    worker = stack.start_worker("--max-batch-size", "4", "--max-wait-ms", "300", env=faulty)
    client = stack.client()
    trigger = Job(task="qa", media=[uris[0]], question=LONG_QUESTION, max_new_tokens=4)
    ids = [client.submit(trigger).id] + [client.submit(Job(media=[u], max_new_tokens=4)).id for u in uris]

    assert worker.proc.wait(120) == EXIT_RESTART
    assert logged in worker.log_path.read_text()
    stack.start_worker("--max-batch-size", "4", env=FAST_REDELIVERY)  # its supervisor starts a new one
    results = client.collect(ids, progress=False, timeout=120)

    print(f"\n{fault}: {len(ids)} jobs, worker exit {EXIT_RESTART}, all redelivered to the next worker")
    assert [r.status for r in results] == ["succeeded"] * len(ids)
    assert results[0].attempts == 2  # the trigger's first start was on the dead worker


def test_a_hung_decoder_in_process_fails_its_job_and_the_worker_drains_and_exits(stack: Stack) -> None:
    # Decoding in the worker's own process (--preprocess-workers 0): the hung thread cannot be freed, so the worker
    # restarts. In the pool only the decoder's process is replaced (tests/integration/test_preprocess.py).
    hang_uri, uris, env = hanging_video(stack)
    worker = stack.start_worker("--preprocess-workers", "0", "--max-batch-size", "2", env=env)
    client = stack.client()
    hung = client.submit(Job(media=[hang_uri], max_new_tokens=4))

    result = hung.result(timeout=60)
    assert (result.status, result.error and result.error.code) == ("failed", "media_undecodable")
    assert "VLMQ_MAX_DECODE_S=2 s" in (result.error.message if result.error else "")
    assert worker.proc.wait(60) == EXIT_RESTART  # after a warm shutdown: nothing was running any more
    stack.start_worker("--max-batch-size", "2")
    assert [r.status for r in client.run([Job(media=[u], max_new_tokens=4) for u in uris], progress=False)] == [
        "succeeded",
        "succeeded",
    ]


def test_a_job_older_than_its_ttl_fails_expired_unrun(stack: Stack) -> None:
    uris = upload_images(stack, "ttl", 1)
    stack.start_worker("--max-batch-size", "2", env={"VLMQ_JOB_TTL_S": "30"})
    client = stack.client()
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    jobs = [
        Job(media=uris, max_new_tokens=4, ttl_s=60, submitted_at=an_hour_ago),
        Job(media=uris, max_new_tokens=4, submitted_at=an_hour_ago),  # the worker's VLMQ_JOB_TTL_S
        Job(media=uris, max_new_tokens=4, ttl_s=7200, submitted_at=an_hour_ago),
        Job(media=uris, max_new_tokens=4, ttl_s=60),
    ]
    results = client.run(jobs, progress=False, timeout=120)

    assert [(r.status, r.error and r.error.code) for r in results] == [
        ("failed", "expired"),
        ("failed", "expired"),
        ("succeeded", None),
        ("succeeded", None),
    ]
    assert results[1].error is not None and "time to live of 30 s" in results[1].error.message


def test_sigterm_finishes_running_jobs_and_leaves_the_rest_queued(stack: Stack) -> None:
    uris = upload_images(stack, "drain", 4)
    worker = stack.start_worker("--max-batch-size", "2", "--concurrency", "2")
    client = stack.client()
    ids = [client.submit(Job(media=[uris[i % 4]], max_new_tokens=48)).id for i in range(16)]
    while b"finished: " not in worker.log_path.read_bytes():
        assert worker.proc.poll() is None
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    finished_first = count_in_logs(stack, r"job (\S+) finished: ")

    stack.start_worker("--max-batch-size", "2", "--concurrency", "2")
    results = client.collect(ids, progress=False, timeout=300)

    runs = count_in_logs(stack, r"job (\S+) finished: ")
    print(f"\nSIGTERM drain: {len(ids)} jobs, {len(finished_first)} finished before exit, rest by the next worker")
    assert 0 < len(finished_first) < len(ids)
    assert [r.status for r in results] == ["succeeded"] * len(ids)
    assert runs == dict.fromkeys(ids, 1)  # each job ran once: none lost, none run twice
