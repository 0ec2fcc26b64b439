"""`vlmq worker --gpus`: a child that cannot start with its settings stops the supervisor instead of a restart loop."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from worker.settings import default_preprocess_workers, usable_cores
from worker.supervisor import EXIT_CANNOT_START, Supervisor


def test_a_child_that_exits_with_cannot_start_stops_the_supervisor_with_that_status() -> None:
    supervisor = Supervisor(["0"], ["--no-such-flag"])  # argparse refuses it: status 2, as a ConfigError does

    status = supervisor.run(poll_s=0.05)

    assert status == EXIT_CANNOT_START == 2
    assert supervisor.children["0"].restart_at is None  # never scheduled for a restart


def test_each_gpu_worker_gets_its_share_of_the_cores_for_preprocessing(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_preprocess_workers() == min(8, max(1, cores - 1))
    assert default_preprocess_workers(workers_on_host=cores) == 1  # never none
    quota = tmp_path / "cpu.max"
    quota.write_text("250000 100000\n")  # a container limited to 2.5 CPUs
    assert usable_cores(str(quota)) == min(cores, 3)
    quota.write_text("max 100000\n")
    assert usable_cores(str(quota)) == cores
    assert usable_cores(str(tmp_path / "absent")) == cores


def test_each_gpu_worker_gets_its_own_name_and_celery_node_name_also_with_worker_name_set() -> None:
    from worker.app import _worker_argv
    from worker.settings import WorkerSettings

    def names(env: dict[str, str]) -> list[str]:
        supervisor = Supervisor(["0", "1"], [], env=env)
        return [supervisor.child_env(n, gpu)["VLMQ_WORKER_NAME"] for n, gpu in enumerate(supervisor.gpus)]

    host = socket.gethostname()
    assert names({}) == [f"{host}:gpu0", f"{host}:gpu1"]
    assert names({"VLMQ_WORKER_NAME": "box"}) == ["box:gpu0", "box:gpu1"]
    nodes = [_worker_argv(WorkerSettings(), name, 16) for name in names({"VLMQ_WORKER_NAME": "box"})]
    assert [next(a for a in argv if a.startswith("--hostname=")) for argv in nodes] == [
        "--hostname=vlmq-box-gpu0@%h",
        "--hostname=vlmq-box-gpu1@%h",
    ]
