"""Outages of the services a worker depends on, in real processes: Redis restarted mid-run, S3 down for a while.

Each test starts its own redis-server or SeaweedFS, so that stopping it leaves the session's shared servers (and the
tests using them) alone, and prints its figures (jobs, outage, retried, lost) for docs/reliability.md.
"""

from __future__ import annotations

import gc
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Job
from tests.conftest import MEDIA_BUCKET, RESULTS_BUCKET, Stack
from tests.helpers import FAST_REDELIVERY, RECEIVED, results_ready, upload_images
from worker.consumer import HELD
from worker.devtools.local_services import RedisServer, SeaweedS3, Service, wait_until
from worker.visibility import UNACKED, UNACKED_INDEX

# Retries must outlast the ~15 s outage: 12 retries waiting 0.5-1, 1-2, then 2-4 s each (equal jitter) span 37 s
# at least.
S3_RETRIES = {
    "VLMQ_RETRY_BACKOFF_S": "1",
    "VLMQ_RETRY_BACKOFF_MAX_S": "4",
    "VLMQ_MAX_RETRIES": "12",
    "VLMQ_VISIBILITY_TIMEOUT_S": "30",
}
RETRY_LOGGED = re.compile(rb"job \S+: .*; retry \d+ in [\d.]+ s")


def own_stack(redis_server: RedisServer, s3: SeaweedS3, model: Path, workdir: Path, mp: pytest.MonkeyPatch) -> Stack:
    stack = Stack(redis=redis_server, s3=s3, model=model, workdir=workdir)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        mp.setenv(name, stack.env[name])  # the test's own Client reads S3 too
    return stack


def wait_for(check: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `check` until it is true or `timeout_s` passed; returns its last value (errors count as false)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return True
        except (OSError, redis.RedisError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def all_results(stack: Stack, job_ids: list[str], timeout_s: float) -> int:
    """Wait until every job has a result in Redis, or `timeout_s` passed; returns how many have one."""
    wait_for(lambda: results_ready(stack, job_ids) == len(job_ids), timeout_s)
    return results_ready(stack, job_ids)


def in_log(worker: Service, pattern: str, since: int = 0) -> Counter[str]:
    """Matches of `pattern`'s group (a job id) in the worker's log, from byte `since` on."""
    return Counter(re.findall(pattern, worker.log_path.read_bytes()[since:].decode(errors="replace")))


def test_the_worker_resumes_by_itself_when_redis_restarts_mid_run_and_no_job_is_lost(
    s3_server: SeaweedS3, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    stack = own_stack(server, s3_server, tiny_model, tmp_path, monkeypatch)
    try:
        uris = upload_images(stack, f"outage-{stack.queue}", 20)
        worker = stack.start_worker("--max-batch-size", "4", env=FAST_REDELIVERY)
        pid = worker.proc.pid
        client = stack.client()
        jobs = [Job(media=[uris[i % len(uris)]], max_new_tokens=4, metadata={"n": str(i)}) for i in range(80)]
        ids = [client.submit(job).id for job in jobs[:60]]
        wait_until(lambda: results_ready(stack, ids) >= 4, 120, "the first results", worker.proc)

        before = results_ready(stack, ids)
        restart_at = worker.log_path.stat().st_size
        down_at = time.monotonic()
        server.stop()  # SIGTERM: Redis writes its AOF

        def finished_while_down() -> bool:
            log = worker.log_path.read_bytes()[restart_at:]
            lost = log.find(b"Connection to broker lost")
            return lost >= 0 and b" finished: " in log[lost:]

        # Down until the worker noticed and finished a job it cannot report: the hard case for its result.
        noticed = wait_for(finished_while_down, 30)
        server.start()  # the same port and data dir
        down_s = time.monotonic() - down_at
        ids += [client.submit(job).id for job in jobs[60:]]
        done = all_results(stack, ids, timeout_s=240)

        after = in_log(worker, r"job (\S+) finished: ", since=restart_at)
        runs = in_log(worker, r"job (\S+) finished: ")
        received = in_log(worker, RECEIVED)
        print(
            f"\nredis restart: {len(ids)} jobs, 1 restart (at {before} results, down {down_s:.1f} s, a job finished "
            f"meanwhile: {noticed}), lost {len(ids) - done}, {sum(after.values())} finished after the restart, "
            f"{sum(1 for i in ids if received[i] > 1)} received twice, run twice {sum(1 for i in ids if runs[i] > 1)}"
        )
        assert worker.proc.poll() is None and worker.proc.pid == pid and len(stack.workers) == 1, worker.log_tail()
        assert [i for i in ids if runs[i] > 1] == []  # a running job's message stayed held: it did not run again
        assert before < 60, "every job had finished before Redis stopped: nothing was restarted mid-run"
        assert done == len(ids), f"{len(ids) - done} jobs have no result; worker log:\n{worker.log_tail(60)}"
        results = client.collect(ids, progress=False, timeout=30)
        assert [r.status for r in results] == ["succeeded"] * len(ids)
        assert [r.metadata["n"] for r in results] == [str(i) for i in range(len(ids))]
        # The same process consumed after the restart: every job submitted after it, at least.
        assert [i for i in ids[60:] if not after[i]] == [], worker.log_tail(60)
    finally:
        stack.stop_workers()
        server.stop()


def test_jobs_retry_through_an_s3_outage_and_all_succeed_with_their_results_stored(
    redis_server: RedisServer, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = SeaweedS3(tmp_path / "seaweedfs")
    stack = own_stack(redis_server, s3, tiny_model, tmp_path, monkeypatch)
    try:
        s3.start()
        for bucket in (MEDIA_BUCKET, RESULTS_BUCKET):
            s3.create_bucket(bucket)
        uris = upload_images(stack, "outage", 20)
        worker = stack.start_worker("--max-batch-size", "4", env=S3_RETRIES)
        client = stack.client()
        jobs = [Job(media=[uris[i % len(uris)]], max_new_tokens=4, metadata={"n": str(i)}) for i in range(40)]
        ids = [client.submit(job).id for job in jobs]
        wait_until(lambda: results_ready(stack, ids) >= 4, 120, "the first results", worker.proc)

        before = results_ready(stack, ids)
        down_at = time.monotonic()
        s3.stop()  # SIGTERM, then SIGKILL
        wait_until(lambda: RETRY_LOGGED.search(worker.log_path.read_bytes()) is not None, 60, "a retry", worker.proc)
        time.sleep(max(0.0, down_at + 10 - time.monotonic()))  # the outage itself: S3 stays down >= 10 s
        s3.start()  # the same ports and data dir
        # Until its volume server registers again, SeaweedFS answers reads with InternalError at once: still down.
        media = s3.client()
        wait_until(lambda: media.get_object(Bucket=MEDIA_BUCKET, Key="outage/0.png") is not None, 60, "S3 reads")
        outage_s = time.monotonic() - down_at
        done = all_results(stack, ids, timeout_s=240)

        peeked = [client.peek(i) for i in ids]  # None: no result
        attempts = [r.attempts for r in peeked if r is not None]
        print(
            f"\ns3 outage: {len(ids)} jobs, outage {outage_s:.0f} s (at {before} results), retried "
            f"{sum(1 for a in attempts if a > 1)} ({len(RETRY_LOGGED.findall(worker.log_path.read_bytes()))} retries "
            f"logged, most attempts {max(attempts, default=0)}), lost {len(ids) - done}"
        )
        assert before < len(ids), "every job had finished before S3 stopped: nothing was retried mid-run"
        assert done == len(ids), f"{len(ids) - done} jobs have no result; worker log:\n{worker.log_tail(60)}"
        results = client.collect(ids, progress=False, timeout=30)
        assert [(r.status, r.error) for r in results] == [("succeeded", None)] * len(ids)
        assert [r.metadata["n"] for r in results] == [str(i) for i in range(len(ids))]
        assert any(r.attempts > 1 for r in results)
        stored = [client.result_store.read(i) for i in ids]
        assert [(s.id, s.status) if s else None for s in stored] == [(i, "succeeded") for i in ids]
    finally:
        stack.stop_workers()
        s3.stop()


def test_an_ack_on_a_connection_lost_meanwhile_does_not_stop_the_worker(redis_server: RedisServer) -> None:
    # The race behind a worker that stopped with status 0 after a Redis restart (kombu 5.7): a task that ended while
    # the consumer reconnected acknowledged its message on the old channel, whose client kombu had dropped.
    from kombu import Connection

    from worker.consumer import TolerantMessage

    def message(connection: Connection, tag: str) -> TolerantMessage:
        properties = {"delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": "q"}}
        envelope = {"body": "e30=", "content-type": "application/json", "headers": {}, "properties": properties}
        return TolerantMessage(envelope, channel=connection.channel())

    live = Connection(redis_server.url)
    acked = message(live, "tag-live")
    acked.ack()  # a live connection: kombu's own ack
    dropped_client = Connection(redis_server.url)
    first = message(dropped_client, "tag-1")
    first.channel.connection.client = None  # the state of the race: the transport forgot its client
    dropped = Connection(redis_server.url)
    second = message(dropped, "tag-2")
    dropped.collect()  # and once kombu collected the connection: the channel forgot its transport

    client = redis.Redis.from_url(redis_server.url)
    for tag in ("tag-1", "tag-2"):  # as kombu recorded them when it delivered them
        client.zadd(UNACKED_INDEX, {tag: 1.0})
        client.hset(UNACKED, tag, "[]")
    HELD.client = client
    try:
        first.ack()  # through the worker's own client, not raised
        second.ack()
    finally:
        HELD.client = None

    assert (acked.acknowledged, first.acknowledged, second.acknowledged) == (True, True, True)
    assert (client.zcard(UNACKED_INDEX), client.hlen(UNACKED)) == (0, 0)


def test_a_lost_connection_keeps_running_jobs_messages_held_and_leaves_the_others_to_the_timeout(
    tmp_path: Path,
) -> None:
    """kombu's own channel on a real Redis: of two delivered messages, the one whose task runs stays in the
    unacknowledged set and the heartbeat keeps re-arming it; the other (a retry Celery forgets on reconnecting)
    stays there too, for the visibility timeout to bring back; neither goes back to the queue at once."""
    from celery.worker.state import active_requests
    from kombu import Connection
    from kombu.transport import redis as kombu_redis

    from worker.consumer import VlmqChannel, hold_running

    class Transport(kombu_redis.Transport):
        Channel = VlmqChannel

    class Running:  # what hold_running reads of a Celery request
        def __init__(self, message: object) -> None:
            self.message = message

    redis_server = RedisServer(tmp_path / "redis").start()  # its own: what it leaves unacknowledged stays there
    queue = f"q-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url)
    for n in range(2):
        body = {"body": "e30=", "content-type": "application/json", "headers": {"n": n}, "properties": {}}
        client.lpush(queue, json.dumps(body))
    received: list[Any] = []
    connection = Connection(redis_server.url, transport=Transport)
    channel = connection.default_channel
    channel.basic_consume(queue, no_ack=False, callback=received.append, consumer_tag="test")
    while len(received) < 2:
        connection.drain_events(timeout=10)
    running = Running(received[0])
    active_requests.add(running)
    try:
        hold_running(connection)
        connection.collect()
        held, tags = HELD.tags(), [m.delivery_tag for m in received]
        assert client.llen(queue) == 0
        assert sorted(client.hkeys(UNACKED)) == sorted(t.encode() for t in tags)
        assert held == tags[:1]
    finally:
        active_requests.discard(running)
        del running, received, channel, connection
        gc.collect()  # the channel leaves HELD: other tests' heartbeats do not see its messages
        redis_server.stop()
