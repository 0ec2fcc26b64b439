"""`vlmq worker --gpus`: a child that cannot start with its settings stops the supervisor instead of a restart loop."""

from __future__ import annotations

import os
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
