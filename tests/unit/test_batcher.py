"""The micro-batcher's policy, driven by a fake clock: size flush, time flush, grouping, failure isolation."""

from __future__ import annotations

import threading

import pytest

from worker.batcher import Batcher, BatcherClosed


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(max_batch_size: int = 3, max_wait_s: float = 0.05, handler=None) -> tuple[Batcher, FakeClock]:
    clock = FakeClock()
    batcher: Batcher = Batcher(
        handler or (lambda items: [f"out-{i}" for i in items]),
        max_batch_size=max_batch_size,
        max_wait_s=max_wait_s,
        clock=clock,
    )
    return batcher, clock


def items_of(batch) -> list:
    return [p.item for p in batch]


def test_nothing_waiting_means_no_batch_and_no_deadline() -> None:
    batcher, _ = make()
    assert batcher.poll() == (None, None)


def test_a_lone_item_waits_out_max_wait_then_flushes_alone() -> None:
    batcher, clock = make(max_wait_s=1.0)
    batcher.submit("a")
    clock.advance(0.25)
    batch, wait = batcher.poll()
    assert batch is None
    assert wait == 0.75
    clock.advance(0.75)
    batch, wait = batcher.poll()
    assert items_of(batch) == ["a"]
    assert wait is None
    assert len(batcher) == 0


def test_a_full_batch_flushes_at_once_without_waiting() -> None:
    batcher, _ = make(max_batch_size=3)
    for item in "abcd":
        batcher.submit(item)
    batch, _ = batcher.poll()
    assert items_of(batch) == ["a", "b", "c"]
    assert len(batcher) == 1


def test_time_flush_takes_everything_ready_of_the_oldest_items_key_in_arrival_order() -> None:
    batcher, clock = make(max_batch_size=8, max_wait_s=1.0)
    batcher.submit("img-1", key="image")
    clock.advance(0.25)
    batcher.submit("vid-1", key="video")
    batcher.submit("img-2", key="image")
    clock.advance(0.75)
    batch, _ = batcher.poll()
    assert items_of(batch) == ["img-1", "img-2"]
    batch, wait = batcher.poll()
    assert batch is None
    assert wait == 0.25  # vid-1 arrived 0.75 s ago


def test_items_with_different_keys_never_share_a_batch() -> None:
    batcher, _ = make(max_batch_size=4, max_wait_s=0.0)
    for i, key in enumerate(["a", "b", "a", "b", "a"]):
        batcher.submit(f"{key}{i}", key=key)
    batches = []
    while (batch := batcher.poll()[0]) is not None:
        batches.append(items_of(batch))
    assert batches == [["a0", "a2", "a4"], ["b1", "b3"]]


def test_a_full_group_flushes_before_an_older_partial_group() -> None:
    batcher, _ = make(max_batch_size=2, max_wait_s=10)
    batcher.submit("slow", key="x")
    batcher.submit("f1", key="y")
    batcher.submit("f2", key="y")
    batch, _ = batcher.poll()
    assert items_of(batch) == ["f1", "f2"]
    assert batcher.poll()[0] is None


def test_each_item_gets_its_own_result_or_its_own_exception() -> None:
    def handler(items):
        return [ValueError(f"bad {i}") if i == "bad" else i.upper() for i in items]

    batcher, _ = make(max_batch_size=3, handler=handler)
    futures = [batcher.submit(i) for i in ["ok", "bad", "fine"]]
    batcher.run_batch(batcher.poll()[0])
    assert futures[0].result() == "OK"
    assert futures[2].result() == "FINE"
    with pytest.raises(ValueError, match="bad bad"):
        futures[1].result()


def test_a_crashing_handler_fails_only_its_own_batch() -> None:
    calls = []

    def handler(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    batcher, _ = make(max_batch_size=2, handler=handler)
    first = [batcher.submit(i) for i in "ab"]
    second = [batcher.submit(i) for i in "cd"]
    batcher.run_batch(batcher.poll()[0])
    batcher.run_batch(batcher.poll()[0])
    assert [type(f.exception()) for f in first] == [RuntimeError, RuntimeError]
    assert [f.result() for f in second] == ["c", "d"]


def test_a_handler_returning_the_wrong_number_of_outcomes_fails_the_batch_loudly() -> None:
    batcher, _ = make(max_batch_size=2, handler=lambda items: items[:1])
    futures = [batcher.submit(i) for i in "ab"]
    batcher.run_batch(batcher.poll()[0])
    assert all("1 outcomes for 2 items" in str(f.exception()) for f in futures)


def test_close_runs_what_is_queued_then_refuses_new_items() -> None:
    batches = []
    batcher = Batcher(lambda items: batches.append(list(items)) or items, max_batch_size=10, max_wait_s=60)
    futures = [batcher.submit(i) for i in "xyz"]
    batcher.start()
    batcher.close(timeout=10)
    assert [f.result(timeout=1) for f in futures] == ["x", "y", "z"]
    assert batches == [["x", "y", "z"]]  # closing flushes at once, without waiting out max_wait
    with pytest.raises(BatcherClosed):
        batcher.submit("late")


def test_concurrent_submitters_are_served_in_batches_no_larger_than_the_maximum() -> None:
    sizes = []
    batcher = Batcher(lambda items: sizes.append(len(items)) or items, max_batch_size=4, max_wait_s=0.01)
    batcher.start()
    results = [None] * 40

    def submit(i: int) -> None:
        results[i] = batcher.submit(i).result(timeout=10)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close(timeout=10)
    assert results == list(range(40))
    assert sum(sizes) == 40
    assert max(sizes) <= 4


def test_invalid_limits_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        Batcher(lambda items: items, max_batch_size=0, max_wait_s=0.1)


def test_a_batch_holds_only_as_many_items_as_fit_and_flushes_at_once_when_the_next_would_not() -> None:
    clock = FakeClock()
    # items are prompt lengths; a batch fits while its longest times its size stays within 1,000 (the engine's KV pool)
    batcher: Batcher = Batcher(
        lambda items: items, max_batch_size=8, max_wait_s=1.0, fits=lambda b: max(b) * len(b) <= 1000, clock=clock
    )
    for length in (100, 200, 300, 400, 100):
        batcher.submit(length)
    batch, _ = batcher.poll()
    assert items_of(batch) == [100, 200, 300]  # a fourth (400 x 4) would not fit: full, no waiting
    batch, wait = batcher.poll()
    assert batch is None and wait == 1.0  # 400 and 100 fit together (800) and wait for more


def test_a_lone_item_that_fits_nothing_still_runs_alone() -> None:
    clock = FakeClock()
    batcher: Batcher = Batcher(lambda items: items, max_batch_size=8, max_wait_s=1.0, fits=lambda b: False, clock=clock)
    batcher.submit(5000)
    batcher.submit(10)
    batch, _ = batcher.poll()
    assert items_of(batch) == [5000]


def test_a_partial_batch_does_not_wait_when_no_more_jobs_are_on_their_way() -> None:
    from worker.batcher import Incoming

    clock, incoming = FakeClock(), Incoming()
    batcher: Batcher = Batcher(lambda items: items, max_batch_size=8, max_wait_s=1.0, incoming=incoming, clock=clock)
    with incoming.job():  # a job still being prepared
        with incoming.job():
            batcher.submit("a")  # counted until it is handed over: the batcher waits for the other
        batcher.submit("b")
        assert batcher.poll() == (None, 1.0)
    batch, wait = batcher.poll()
    assert items_of(batch) == ["a", "b"] and wait is None


def test_a_handler_may_answer_with_a_future_and_each_item_gets_its_own_outcome_when_it_resolves() -> None:
    from concurrent.futures import Future

    answers: Future = Future()
    batcher, _ = make(max_batch_size=2, handler=lambda items: answers)
    a, b = batcher.submit("a"), batcher.submit("b")
    batch, _ = batcher.poll()
    batcher.run_batch(batch)
    assert not a.done() and not b.done()  # the batcher went on; the batch runs elsewhere
    answers.set_result(["out-a", ValueError("b failed alone")])
    assert a.result() == "out-a"
    with pytest.raises(ValueError, match="b failed alone"):
        b.result()


def test_incoming_counts_jobs_on_their_way_only_while_they_are() -> None:
    from worker.batcher import Incoming

    incoming, heard = Incoming(), []
    incoming.listen(lambda: heard.append(incoming.any()))
    assert not incoming.any()
    with incoming.job():
        assert incoming.any()
        with pytest.raises(RuntimeError), incoming.job():
            raise RuntimeError("the job failed while being prepared")
        assert incoming.any()
    assert not incoming.any()
    assert heard == [True, False]  # the batcher hears of each job that stops counting
