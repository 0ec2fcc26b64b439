"""The preprocessing pool (worker/preprocess.py) in real worker processes: a pool process killed mid-job, a job that
keeps killing them, and a hung decoder, each with the worker staying up and every job ending once."""

from __future__ import annotations

import json
import time

import psutil

from producer import Job
from tests.conftest import MEDIA_BUCKET, Stack
from tests.helpers import count_in_logs, hanging_video, scrape, upload_images
from tests.reference import encode, random_image
from worker.devtools.local_services import Service, free_port
from worker.preprocess import JOBS_PER_PROCESS


def pool_processes(worker: Service) -> list[psutil.Process]:
    """The worker's preprocessing processes (multiprocessing's spawned children; not its resource tracker)."""
    children = psutil.Process(worker.proc.pid).children()
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def wait_for(condition, timeout_s: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_a_pool_process_killed_mid_job_is_replaced_and_its_jobs_are_prepared_again(stack: Stack) -> None:
    uris = upload_images(stack, "pool-kill", 4)
    port = free_port()
    env = {"VLMQ_FAULTS": json.dumps({"slow_prepare_s": 0.3})}  # the pool is the bottleneck
    worker = stack.start_worker(
        "--preprocess-workers", "2", "--max-batch-size", "4", "--metrics-port", str(port), env=env
    )
    before = wait_for(lambda: len(pool_processes(worker)) == 2 and pool_processes(worker))
    client = stack.client()
    ids = [client.submit(Job(media=[uris[i % 4]], max_new_tokens=24)).id for i in range(24)]
    wait_for(lambda: b"finished: succeeded" in worker.log_path.read_bytes())
    victim = before[0]
    victim.kill()

    results = client.collect(ids, progress=False, timeout=300)

    after = wait_for(lambda: len(pool_processes(worker)) == 2 and pool_processes(worker))
    again = count_in_logs(stack, r"job (\S+): its preprocessing process died \(exit -9\); sending it again alone")
    print(f"\npool process {victim.pid} killed holding {len(again)} of {len(ids)} jobs: prepared again, all succeeded")
    assert [r.status for r in results] == ["succeeded"] * len(ids)
    assert [r.attempts for r in results] == [1] * len(ids)  # prepared again inside the worker: no Celery retry
    assert count_in_logs(stack, r"job (\S+) finished: ") == dict.fromkeys(ids, 1)  # none lost, none run twice
    assert 1 <= len(again) <= JOBS_PER_PROCESS and set(again) <= set(ids)  # what it held
    assert worker.proc.poll() is None
    assert victim.pid not in {p.pid for p in after} and before[1].pid in {p.pid for p in after}
    assert scrape(port)[("vlmq_preprocess_restarts_total", ())] == 1


def test_a_job_that_kills_its_pool_process_every_time_fails_worker_lost_and_its_neighbours_succeed(
    stack: Stack,
) -> None:
    uris = upload_images(stack, "pool-crash", 3)
    s3 = stack.s3.client()
    s3.put_object(Bucket=MEDIA_BUCKET, Key="pool-crash/poison.png", Body=encode(random_image(32, 32, 9), "PNG"))
    env = {"VLMQ_MAX_CRASHES": "3", "VLMQ_FAULTS": json.dumps({"preprocess_crash_on": "poison"})}
    worker = stack.start_worker("--preprocess-workers", "1", "--max-batch-size", "2", env=env)
    client = stack.client()
    jobs = [Job(media=[u], max_new_tokens=6) for u in uris]
    poison = Job(media=[f"s3://{MEDIA_BUCKET}/pool-crash/poison.png"], max_new_tokens=6)

    results = client.run([jobs[0], poison, *jobs[1:]], progress=False, timeout=300)

    assert [r.status for r in results] == ["succeeded", "failed", "succeeded", "succeeded"]
    failed = results[1]
    assert failed.error is not None
    assert (failed.error.code, failed.error.retryable, failed.attempts) == ("worker_lost", False, 1)
    assert failed.error.message.startswith("its preprocessing process died 3 times while preparing it (last exit -9)")
    assert worker.proc.poll() is None
    assert count_in_logs(stack, r"a preprocessing process died \(exit (-?\d+)\)") == {"-9": 3}  # one per attempt
    assert [d.result.id for d in client.dead_letters()] == [poison.id]  # as a job that kills whole workers is


def test_a_hung_decoder_in_the_pool_fails_its_job_and_only_its_process_is_replaced(stack: Stack) -> None:
    hang_uri, uris, env = hanging_video(stack)
    worker = stack.start_worker("--preprocess-workers", "1", "--max-batch-size", "2", env=env)
    first = wait_for(lambda: pool_processes(worker))[0]
    client = stack.client()
    hung = client.submit(Job(media=[hang_uri], max_new_tokens=4))

    result = hung.result(timeout=60)
    assert (result.status, result.error and result.error.code) == ("failed", "media_undecodable")
    assert "VLMQ_MAX_DECODE_S=2 s" in (result.error.message if result.error else "")
    after = client.run([Job(media=[u], max_new_tokens=4) for u in uris], progress=False, timeout=120)
    assert [r.status for r in after] == ["succeeded", "succeeded"]
    assert worker.proc.poll() is None
    assert not first.is_running()
    assert [p.pid for p in pool_processes(worker)] != [first.pid]
