"""Manifests: each bad line reported with its number and reason; stable ids; one job per id."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.manifest import InvalidManifest, read_manifest, stable_id, validate_manifest
from producer.settings import ClientSettings


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_stable_ids_follow_what_the_job_is_and_nothing_else(tmp_path: Path) -> None:
    lines = [
        '{"media": ["s3://b/1.png"]}',
        '{"media": ["s3://b/1.png"], "submitted_at": "2026-01-01T00:00:00Z"}',  # same job, sent another time
        '{"media": ["s3://b/1.png"], "metadata": {"row": "7"}}',  # another job
        '{"media": ["s3://b/1.png"], "max_new_tokens": 8}',  # another job
        '{"custom_id": "mine", "media": ["s3://b/1.png"]}',
    ]
    jobs = [job for _, job in read_manifest(write(tmp_path, "a.jsonl", "\n".join(lines)))]
    ids = [job.id for job in jobs if not isinstance(job, str)]
    assert ids[0] == ids[1] == stable_id(jobs[0]) and ids[0].startswith("j-") and len(ids[0]) == 34
    assert len({ids[0], ids[2], ids[3]}) == 3 and ids[4] == "mine"


def test_a_job_id_twice_is_a_bad_line_naming_the_first(tmp_path: Path) -> None:
    text = '{"custom_id": "a", "media": ["s3://b/1.png"]}\n{"media": ["s3://b/2.png"]}\n'
    text += '{"custom_id": "a", "media": ["s3://b/3.png"]}\n{"media": ["s3://b/2.png"]}\n'
    with pytest.raises(InvalidManifest) as caught:
        validate_manifest(write(tmp_path, "dup.jsonl", text))
    assert [(e.line, e.reason.split(";")[0]) for e in caught.value.errors] == [
        (3, "job id 'a' is also on line 1"),
        (
            4,
            f"job id {next(j for n, j in read_manifest(str(tmp_path / 'dup.jsonl')) if n == 2).id!r} is also on line 2",
        ),
    ]


def test_csv_lines_with_a_byte_order_mark_extra_fields_and_missing_values(tmp_path: Path) -> None:
    text = "\ufeffuri,task,question\ns3://b/1.png,qa,What?\ns3://b/2.png,qa,What?,extra\ns3://b/3.png,qa,\n"
    with pytest.raises(InvalidManifest) as caught:
        validate_manifest(write(tmp_path, "a.csv", text))
    assert [(e.line, e.reason) for e in caught.value.errors] == [
        (3, "4 fields, but the header names 3"),
        (4, 'job: Value error, task "qa" needs "question"'),
    ]
    assert validate_manifest(write(tmp_path, "b.csv", "\ufeffuri\ns3://b/1.mp4\n")) == 1


def test_the_interactive_queue_follows_the_queue_unless_set() -> None:
    assert ClientSettings().queues == ["vlmq-interactive", "vlmq"]
    assert ClientSettings(queue="faces").queues == ["faces-interactive", "faces"]
    assert ClientSettings(queue="faces", interactive_queue="now").queues == ["now", "faces"]
