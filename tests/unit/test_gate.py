"""The message gate over every shape a broker message can take: admitted (and how it is normalised), refused with
its task id and code, or refused without an id (dead letter)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kombu.message import Message

from worker import gate
from worker.gate import Admitted, Deadlines, Refused

JOB = {"task": "caption", "media": ["s3://media/cat.jpg"]}
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
V2 = {"task": "vlmq.run", "id": "job-1"}


def message(body: Any, headers: Any = None, content_type: str = "application/json", raw: bool = False) -> Message:
    data = body if raw else json.dumps(body).encode()
    return Message(
        body=data,
        headers=dict(V2) if headers is None else headers,
        content_type=content_type,
        content_encoding="utf-8",
        delivery_info={"routing_key": "vlmq"},
    )


def verdict(msg: Message, max_bytes: int = 10_000) -> Admitted | Refused:
    return gate.inspect(msg, max_bytes, now=NOW)


def refusal(msg: Message, max_bytes: int = 10_000) -> tuple[str | None, str, str]:
    v = verdict(msg, max_bytes)
    assert isinstance(v, Refused), v
    return v.task_id, v.error.code, v.error.message


def test_a_celery_call_passes_unchanged() -> None:
    v = verdict(message([[JOB], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]))
    assert isinstance(v, Admitted)
    assert (v.task_id, v.job, v.changed, v.expires) == ("job-1", JOB, False, None)


def test_only_known_headers_of_the_expected_types_reach_celery_and_no_canvas() -> None:
    headers = {
        **V2,
        "retries": 2,
        "eta": 1_800_000_000,
        "root_id": "r",
        "parent_id": 5,
        "timelimit": [1, 2, 3],
        "ignore_result": True,
        "shadow": "other.task",
        "stamped_headers": 5,
        "argsrepr": "(...)",
    }
    msg = message([[JOB], {}, {"callbacks": [{"task": "x"}], "id": "someone-else"}], headers)
    v = verdict(msg)
    assert isinstance(v, Admitted)
    gate.admit(msg, v)
    assert msg.headers == {
        "task": "vlmq.run",
        "id": "job-1",
        "retries": 2,
        "eta": "2027-01-15T08:00:00+00:00",
        "root_id": "r",
        "argsrepr": "(...)",
    }
    assert msg.payload == [[JOB], {}, {}]


def test_kombu_typed_objects_are_refused_anywhere_in_the_body() -> None:
    typed = {"__type__": "datetime", "__value__": "2020-01-01"}
    assert "kombu-typed object" in refusal(message([[JOB], {}, {"x": typed}]))[2]
    assert "at body[0][0]['metadata']" in refusal(message([[{**JOB, "metadata": typed}], {}, {}]))[2]


def test_a_compressed_body_is_refused_under_its_id() -> None:
    task_id, code, text = refusal(message([[JOB], {}, {}], {**V2, gate.COMPRESSED: "application/x-gzip"}))
    assert (task_id, code) == ("job-1", "invalid_job") and "compressed message bodies" in text


@pytest.mark.parametrize(
    ("body", "normal"),
    [
        ([[JOB], None, {}], [[JOB], {}, {}]),  # celery-node: kwargs null
        ([[JOB], {}, None], [[JOB], {}, {}]),
        ([[], {"job": JOB}, {}], [[JOB], {}, {}]),  # the job as keyword argument
        ([[], {"job": JOB, "force": True}, {}], [[JOB], {"force": True}, {}]),
    ],
)
def test_other_clients_call_shapes_are_normalised(body: Any, normal: Any) -> None:
    msg = message(body)
    v = verdict(msg)
    assert isinstance(v, Admitted)
    assert (v.body, v.changed) == (normal, True)
    gate.admit(msg, v)
    assert json.loads(msg.body) == normal and msg.payload == normal  # Celery decodes the new body, not a cache


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"not": "a job"}, "must be [args, kwargs, embed]; this one is dict"),
        ([[JOB], {}], "this one is a list of 2 items"),
        (None, "this one is null"),
        (5, "this one is int"),
        ("abc", "this one is str"),
        ([[JOB], {}, "x"], "embed (its third item) must be an object, not str"),
        ([{"task": "caption"}, {}, {}], "args as a list and kwargs as an object; got args dict"),
        ([[JOB], [1], {}], "got args list and kwargs list"),
        ([[], {}, {}], "got 0 positional arguments"),
        ([[JOB, "extra"], {}, {}], "got 2 positional arguments"),
        ([[JOB], {"colour": "red"}, {}], "got 1 positional arguments and unknown keyword arguments ['colour']"),
        ([["caption"], {}, {}], "a job must be a JSON object, got str"),
        ([[JOB], {"force": "yes"}, {}], "force must be true or false, not str"),
    ],
)
def test_wrong_shapes_are_refused_under_their_id(body: Any, words: str) -> None:
    task_id, code, text = refusal(message(body))
    assert (task_id, code) == ("job-1", "invalid_job")
    assert words in text


def test_messages_vlmq_cannot_read_are_refused_under_their_id() -> None:
    assert refusal(message(b"\x80\x03}q\x00.", content_type="application/x-python-serialize", raw=True))[:2] == (
        "job-1",
        "invalid_job",
    )
    assert (
        "vlmq workers accept only application/json" in refusal(message(b"a: 1", content_type="text/yaml", raw=True))[2]
    )
    assert "not UTF-8 JSON" in refusal(message(b'["\xff\xfe"]', raw=True))[2]
    assert "not UTF-8 JSON" in refusal(message(b'[[{"task": ', raw=True))[2]
    assert "10,001 bytes, over VLMQ_MAX_MESSAGE_BYTES=10,000" in refusal(message(b" " * 10_001, raw=True))[2]
    assert "unknown task 'tasks.add'" in refusal(message([[JOB], {}, {}], {"task": "tasks.add", "id": "job-1"}))[2]


@pytest.mark.parametrize(
    "headers",
    [
        {"task": "vlmq.run"},
        {"task": "vlmq.run", "id": 42},
        {"task": "vlmq.run", "id": ""},
        {"task": "vlmq.run", "id": "x" * 257},
        {"task": "vlmq.run", "id": "a\nb"},
    ],
)
def test_a_message_without_a_usable_id_is_refused_without_one(headers: Any) -> None:
    task_id, code, text = refusal(message([[JOB], {}, {}], headers))
    assert (task_id, code) == (None, "invalid_job") and "no usable task id" in text


def test_protocol_1_messages_are_read_from_their_body_and_handed_on_as_protocol_2() -> None:
    v1 = {"task": "vlmq.run", "id": "job-1", "args": [JOB], "kwargs": None, "retries": 1, "timelimit": "x"}
    msg = message(v1, {"id": "other"})
    v = verdict(msg)
    assert isinstance(v, Admitted)
    gate.admit(msg, v)
    assert msg.headers == {"task": "vlmq.run", "id": "job-1", "retries": 1}
    assert msg.payload == [[JOB], {}, {}]
    assert refusal(message({**v1, "args": "x"}, {}))[:2] == ("job-1", "invalid_job")
    assert refusal(message({**v1, "id": None}, {}))[:2] == (None, "invalid_job")
    assert refusal(message([[JOB], {}, {}], {}))[:2] == (None, "invalid_job")  # no task header, not a v1 object


def test_celery_expires_is_taken_from_celery_and_handed_to_the_task_past_or_not() -> None:
    for expires in (NOW - timedelta(seconds=1), NOW + timedelta(minutes=5)):  # the task decides (lifecycle.decide)
        msg = message([[JOB], {}, {}], {**V2, "expires": expires.isoformat()})
        v = verdict(msg)
        assert isinstance(v, Admitted) and v.expires == expires
        gate.admit(msg, v)
        assert "expires" not in msg.headers  # Celery would only revoke it, with no result


def test_an_eta_further_ahead_than_the_visibility_timeout_is_refused_and_a_nearer_one_admitted() -> None:
    def at(seconds: float) -> Admitted | Refused:
        eta = (NOW + timedelta(seconds=seconds)).isoformat()
        return gate.inspect(message([[JOB], {}, {}], {**V2, "eta": eta}), 10_000, now=NOW, max_eta_s=900)

    assert isinstance(at(900), Admitted)
    far = at(901)
    assert isinstance(far, Refused)
    assert (far.task_id, far.error.code, far.attempts) == ("job-1", "invalid_job", 1)
    assert far.error.message == (
        "the message's eta (2026-11-30T12:15:01+00:00) is 901 s ahead, more than the broker's visibility timeout "
        "(VLMQ_VISIBILITY_TIMEOUT_S=900): Redis would deliver it again while a worker holds it waiting. Send it at "
        "most that far ahead of its time (keep later jobs on your side until then), or raise "
        "VLMQ_VISIBILITY_TIMEOUT_S on workers and producers alike"
    )
    v1 = {"task": "vlmq.run", "id": "job-1", "args": [JOB], "eta": (NOW + timedelta(hours=2)).isoformat()}
    refused = gate.inspect(message(v1, {}), 10_000, now=NOW, max_eta_s=900)
    assert isinstance(refused, Refused) and refused.error.code == "invalid_job"


def test_a_refused_retry_counts_its_earlier_attempts() -> None:
    refused = verdict(message([[JOB], {}, {}], {**V2, "eta": "not a time", "retries": 2}))
    assert isinstance(refused, Refused) and (refused.error.code, refused.attempts) == ("invalid_job", 3)


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({"eta": "tomorrow"}, "eta 'tomorrow' is not an ISO 8601 time"),
        ({"expires": [1]}, "expires [1] is not an ISO 8601 time"),
        ({"retries": -1}, "retries -1 is not a count"),
        ({"retries": "2"}, "retries '2' is not a count"),
    ],
)
def test_headers_celery_would_choke_on_are_refused(headers: dict[str, Any], words: str) -> None:
    task_id, code, text = refusal(message([[JOB], {}, {}], {**V2, **headers}))
    assert (task_id, code) == ("job-1", "invalid_job") and words in text


def test_a_stamped_job_is_handed_on_with_its_submitted_at() -> None:
    msg = message([[JOB], {}, {}])
    v = verdict(msg)
    assert isinstance(v, Admitted)
    v.stamp("2026-11-30T12:00:00+00:00")
    gate.admit(msg, v)
    assert msg.payload == [[{**JOB, "submitted_at": "2026-11-30T12:00:00+00:00"}], {}, {}]


def test_a_body_kombu_could_not_decompress_is_refused_under_its_id() -> None:
    msg = message([[JOB], {}, {}], {**V2, "compression": "application/x-gzip"})
    refused = gate.undecodable(msg, OSError("Not a gzipped file"))
    assert (refused.task_id, refused.error.code) == ("job-1", "invalid_job")
    assert "could not be decompressed (application/x-gzip)" in refused.error.message


def test_deadlines_are_taken_once_and_bounded() -> None:
    deadlines = Deadlines(most=2)
    for i in range(3):
        deadlines.put(f"j{i}", NOW)
    assert [deadlines.pop(f"j{i}") for i in range(3)] == [None, NOW, NOW]
    assert deadlines.pop("j1") is None
