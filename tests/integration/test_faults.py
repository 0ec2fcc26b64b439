"""Faults in real processes: workers killed mid-batch, a job that kills every worker that runs it.

Each test prints its figures (jobs, faults injected, lost, run twice, dead-lettered) for docs/reliability.md.
"""

from __future__ import annotations

import json

from producer import Job
from tests.conftest import MEDIA_BUCKET, Stack
from tests.helpers import FAST_REDELIVERY, RECEIVED, RETURNED_STORED, count_in_logs, supervise, upload_images


def test_a_job_that_kills_its_worker_is_dead_lettered_and_its_neighbours_finish(stack: Stack) -> None:
    uris = upload_images(stack, "poison", 7)
    poison_uri = uris[3].replace("/3.png", "/poison.png")
    stack.s3.client().copy_object(
        Bucket=MEDIA_BUCKET, Key="poison/poison.png", CopySource={"Bucket": MEDIA_BUCKET, "Key": "poison/3.png"}
    )
    env = {**FAST_REDELIVERY, "VLMQ_FAULTS": json.dumps({"crash_on": "poison.png"}), "VLMQ_MAX_CRASHES": "2"}
    args = ("--max-batch-size", "4", "--max-wait-ms", "100")
    stack.start_worker(*args, env=env)
    client = stack.client()
    jobs = [Job(media=[u], max_new_tokens=4) for u in uris[:3]]
    jobs += [Job(media=[poison_uri], max_new_tokens=4, metadata={"kind": "poison"})]
    jobs += [Job(media=[u], max_new_tokens=4) for u in uris[3:]]
    ids = [client.submit(job).id for job in jobs]

    restarts = supervise(stack, ids, *args, env=env, timeout_s=240)

    results = {i: client.result(i, timeout=10) for i in ids}
    poison = results[ids[3]]
    print(f"\npoison job: {len(ids)} jobs, {restarts} worker crashes, dead-lettered after {poison.attempts} starts")
    assert restarts == 2
    assert (poison.status, poison.error and poison.error.code, poison.attempts) == ("failed", "worker_lost", 3)
    assert poison.metadata == {"kind": "poison"}
    assert [r.status for i, r in results.items() if i != ids[3]] == ["succeeded"] * 7
    letters = client.dead_letters()
    assert [(d.result.id, d.job["media"][0]["uri"]) for d in letters] == [(ids[3], poison_uri)]

    # Fixed worker (no fault): retry-failed runs the job again under its own id.
    stack.stop_workers()
    stack.start_worker(*args, env=FAST_REDELIVERY)
    assert client.retry_failed() == [ids[3]]
    retried = client.result(ids[3], timeout=120)
    assert (retried.status, retried.attempts) == ("succeeded", 1)
    assert client.dead_letters() == []


def test_killing_the_worker_mid_batch_twice_loses_no_job_and_runs_none_twice(stack: Stack) -> None:
    uris = upload_images(stack, "kill", 20)
    args = ("--max-batch-size", "8", "--max-wait-ms", "50")
    stack.start_worker(*args, env=FAST_REDELIVERY)
    client = stack.client()
    jobs = [Job(media=[uris[i % len(uris)]], max_new_tokens=4, metadata={"n": str(i)}) for i in range(320)]
    ids = [client.submit(job).id for job in jobs]
    kills: list[int] = []

    def kill_at_thirds(done: int) -> None:
        if len(kills) < 2 and done >= (len(kills) + 1) * len(ids) // 3:
            worker = stack.workers[-1]
            if worker.proc.poll() is None and b"finished: " in worker.log_path.read_bytes():
                worker.proc.kill()
                worker.proc.wait()
                kills.append(done)

    restarts = supervise(stack, ids, *args, env=FAST_REDELIVERY, timeout_s=150, on_progress=kill_at_thirds)

    results = client.collect(ids, progress=False, timeout=30)
    runs = count_in_logs(stack, r"job (\S+) finished: ")  # logged right after the result is written to S3
    stored = count_in_logs(stack, RETURNED_STORED)  # a redelivered copy returned the stored result
    received = count_in_logs(stack, RECEIVED)
    recovered = count_in_logs(stack, r"job (\S+): its message was lost")
    lost = sum(1 for r in results if not r.ok)
    twice = sum(1 for i in ids if runs[i] > 1)
    redelivered = sum(1 for i in ids if received[i] > 1)
    print(
        f"\nworker kill: {len(ids)} jobs, {len(kills)} SIGKILLs (at {kills} results), {redelivered} redelivered, "
        f"{sum(recovered.values())} lost by the broker and sent again, lost {lost}, duplicated results {twice}"
    )
    assert len(kills) == 2 and restarts == 2 and redelivered > 0
    assert [r.status for r in results] == ["succeeded"] * len(ids)
    assert [r.metadata["n"] for r in results] == [str(i) for i in range(len(ids))]
    # One result write per job; none, only when the worker died between writing it and logging it (then a
    # redelivered copy found it in S3).
    assert {i: (runs[i], stored[i]) for i in ids if runs[i] != 1 and not (runs[i] == 0 and stored[i] >= 1)} == {}
