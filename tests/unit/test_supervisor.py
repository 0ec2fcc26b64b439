"""`vlmq worker --gpus`: a child that cannot start with its settings stops the supervisor instead of a restart loop."""

from __future__ import annotations

from worker.supervisor import EXIT_CANNOT_START, Supervisor


def test_a_child_that_exits_with_cannot_start_stops_the_supervisor_with_that_status() -> None:
    supervisor = Supervisor(["0"], ["--no-such-flag"])  # argparse refuses it: status 2, as a ConfigError does

    status = supervisor.run(poll_s=0.05)

    assert status == EXIT_CANNOT_START == 2
    assert supervisor.children["0"].restart_at is None  # never scheduled for a restart
