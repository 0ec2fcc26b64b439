"""The job lifecycle's decisions, over every case: when to look for a stored success, what to do with a job, and
how long a retry waits."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from producer.core.jobs import JobError, JobResult
from worker.errors import InvalidJob, MediaUnavailable, ResultWriteFailed
from worker.lifecycle import Deadline, Start, decide, retries_left, retry_delay


@pytest.mark.parametrize(
    ("start", "crashes", "look"),
    [
        (Start(starts=1, retries=0, redelivered=False, succeeded_before=False), 0, False),  # a first start
        (Start(starts=3, retries=2, redelivered=False, succeeded_before=False), 0, False),  # a Celery retry
        (Start(starts=1, retries=0, redelivered=True, succeeded_before=False), 0, True),  # its worker may have died
        (Start(starts=1, retries=0, redelivered=False, succeeded_before=True), 0, True),  # a resubmitted success
        (Start(starts=2, retries=0, redelivered=False, succeeded_before=False), 1, True),  # sent again by recovery
        (Start(starts=2, retries=0, redelivered=True, succeeded_before=True, force=True), 1, False),  # force
    ],
)
def test_a_stored_success_is_looked_for_when_an_earlier_copy_may_have_finished(
    start: Start, crashes: int, look: bool
) -> None:
    assert (start.crashes, start.may_have_finished) == (crashes, look)


NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_a_stored_failure_ends_only_a_copy_of_the_message_it_was_stored_for() -> None:
    def stored(status: str, finished_at: datetime) -> JobResult:
        error = None if status == "succeeded" else JobError(code="media_not_found", message="gone", retryable=False)
        return JobResult(id="j", status=status, error=error, attempts=1, finished_at=finished_at)  # type: ignore[arg-type]

    copy = Start(starts=2, retries=0, redelivered=True, succeeded_before=False)
    resubmitted = Start(starts=1, retries=0, redelivered=False, succeeded_before=False)
    earlier, later = NOW - timedelta(minutes=1), NOW + timedelta(minutes=1)
    assert copy.ended_by(stored("failed", later), submitted_at=NOW)  # its worker died after storing its end
    assert not copy.ended_by(stored("failed", earlier), submitted_at=NOW)  # an earlier submission's failure
    assert not copy.ended_by(stored("failed", later), submitted_at=None)  # cannot tell: run it
    assert not resubmitted.ended_by(stored("failed", earlier), submitted_at=NOW)  # sent again after it failed
    assert resubmitted.ended_by(stored("succeeded", earlier), submitted_at=NOW)  # a success is final


ON_TIME = Deadline(expires=NOW + timedelta(seconds=1), submitted_at=NOW - timedelta(seconds=59), ttl_s=60)


def test_the_decision_over_every_combination() -> None:
    decisions = {}
    for starts, expired, cancelled in itertools.product((1, 2, 3), (False, True), (False, True)):
        start = Start(starts=starts, retries=0, redelivered=True, succeeded_before=False)
        deadline = Deadline(expires=NOW) if expired else ON_TIME
        decisions[starts, expired, cancelled] = decide(
            start, max_crashes=2, deadline=deadline, now=NOW, cancelled=cancelled
        )
    assert decisions == {
        (1, False, False): "run",
        (2, False, False): "run",  # one crash, under VLMQ_MAX_CRASHES=2
        (3, False, False): "dead",  # two crashes
        **{(s, True, c): "expired" for s in (1, 2, 3) for c in (False, True)},  # expiry comes first
        **{(s, False, True): "cancelled" for s in (1, 2, 3)},  # then a cancelled batch, before crash counting
    }


def test_a_job_expires_at_its_celery_expires_or_past_its_time_to_live_whichever_comes_first() -> None:
    assert ON_TIME.passed(NOW) is None
    assert Deadline().passed(NOW) is None  # neither set: it never expires
    assert Deadline(expires=NOW).passed(NOW) == (
        "the message's Celery expires (2026-12-04T12:00:00+00:00) passed before it started; it was not run"
    )
    assert Deadline(submitted_at=NOW - timedelta(seconds=90), ttl_s=60).passed(NOW) == (
        "the job was taken 90.0 s after it was submitted, past its time to live of 60 s (ttl_s or VLMQ_JOB_TTL_S); "
        "it was not run. Submit it again if it is still wanted"
    )
    assert Deadline(submitted_at=NOW - timedelta(seconds=90), ttl_s=None).passed(NOW) is None


def test_only_retryable_errors_retry_and_only_while_retries_are_left() -> None:
    assert retries_left(MediaUnavailable("s3 down"), retries=4, max_retries=5)
    assert not retries_left(MediaUnavailable("s3 down"), retries=5, max_retries=5)
    assert retries_left(ResultWriteFailed("put failed"), retries=0, max_retries=1)
    assert not retries_left(InvalidJob("bad"), retries=0, max_retries=5)


def test_retry_delays_double_with_equal_jitter_up_to_the_cap() -> None:
    lowest = [retry_delay(n, backoff_s=2, max_s=30, draw=lambda a, b: a) for n in range(6)]
    highest = [retry_delay(n, backoff_s=2, max_s=30, draw=lambda a, b: b) for n in range(6)]
    assert lowest == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]  # half of 2, 4, 8, 16, 30 (capped), 30 is fixed
    assert highest == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
