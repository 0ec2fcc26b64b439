"""Scaling out: several worker processes on one queue share the jobs without running any twice, and the
`--gpus` supervisor restarts a child that dies (CPU "GPUs" here: each child gets CUDA_VISIBLE_DEVICES and --device
cpu)."""

from __future__ import annotations

import os
import re
import signal

from producer import Job
from tests.conftest import Stack
from tests.helpers import FAST_REDELIVERY, count_in_logs, results_ready, upload_images
from worker.devtools.local_services import wait_until


def test_three_workers_on_one_queue_share_the_jobs_and_run_none_twice(stack: Stack) -> None:
    uris = upload_images(stack, "scale", 10)
    for _ in range(3):
        stack.start_worker("--max-batch-size", "4")
    client = stack.client()
    jobs = [Job(media=[uris[i % 10]], max_new_tokens=4, metadata={"n": str(i)}) for i in range(90)]
    results = client.run(jobs, progress=False, timeout=300)

    runs = count_in_logs(stack, r"job (\S+) finished: ")
    by_worker = {w: sum(1 for r in results if r.worker == w) for w in {r.worker for r in results}}
    print(f"\nthree workers: {len(jobs)} jobs, per worker {sorted(by_worker.values())}")
    assert [r.status for r in results] == ["succeeded"] * len(jobs)
    assert [r.metadata["n"] for r in results] == [str(i) for i in range(len(jobs))]
    assert runs == {job.id: 1 for job in jobs}
    assert len(by_worker) == 3


def test_the_gpu_supervisor_restarts_a_killed_child_and_its_jobs_finish(stack: Stack) -> None:
    uris = upload_images(stack, "gpus", 10)
    supervisor = stack.start_worker("--gpus", "0,1", "--max-batch-size", "4", env=FAST_REDELIVERY, ready_count=2)
    pids = dict(re.findall(r"started the worker for GPU (\d) \(pid (\d+)\)", supervisor.log_path.read_text()))
    assert sorted(pids) == ["0", "1"]
    client = stack.client()
    ids = [client.submit(Job(media=[uris[i % 10]], max_new_tokens=4)).id for i in range(60)]
    wait_until(lambda: results_ready(stack, ids) >= 10, 120, "10 results", supervisor.proc)
    os.kill(int(pids["0"]), signal.SIGKILL)

    results = client.collect(ids, progress=False, timeout=300)
    # two children, then the restarted one
    wait_until(lambda: supervisor.log_path.read_text().count(" ready.") == 3, 120, "the restarted child")
    log = supervisor.log_path.read_text()
    print(f"\n--gpus supervisor: {len(ids)} jobs, 1 child SIGKILLed and restarted")
    assert f"the worker for GPU 0 (pid {pids['0']}) exited with status -9; restarting it in 1 s" in log
    assert {r.worker for r in results} <= {f"{os.uname().nodename}:gpu0", f"{os.uname().nodename}:gpu1"}
    assert [r.status for r in results] == ["succeeded"] * len(ids)

    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(60) == 0
    restarted = re.findall(r"started the worker for GPU 0 \(pid (\d+)\)", log)[-1]
    assert [pid for pid in (pids["1"], restarted) if os.path.exists(f"/proc/{pid}")] == []  # the supervisor reaped them
