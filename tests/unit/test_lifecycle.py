"""The job lifecycle's decisions, over every case: when to look for a stored success, what to do with a job, and
how long a retry waits."""

from __future__ import annotations

import itertools

import pytest

from worker.errors import InvalidJob, MediaUnavailable, ResultWriteFailed
from worker.lifecycle import Start, decide, retries_left, retry_delay


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


def test_the_decision_over_every_combination() -> None:
    decisions = {}
    for starts, expired, cancelled in itertools.product((1, 2, 3), (False, True), (False, True)):
        start = Start(starts=starts, retries=0, redelivered=True, succeeded_before=False)
        decisions[starts, expired, cancelled] = decide(start, max_crashes=2, expired=expired, cancelled=cancelled)
    assert decisions == {
        (1, False, False): "run",
        (2, False, False): "run",  # one crash, under VLMQ_MAX_CRASHES=2
        (3, False, False): "dead",  # two crashes
        **{(s, True, c): "expired" for s in (1, 2, 3) for c in (False, True)},  # expiry comes first
        **{(s, False, True): "cancelled" for s in (1, 2, 3)},  # then a cancelled batch, before crash counting
    }


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
