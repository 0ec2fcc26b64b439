"""The wire contract: what a valid job is, and that a bad one is refused naming the bad field."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from producer import Job, JobResult
from producer.settings import ClientSettings


def error_fields(exc: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    return [".".join(map(str, e["loc"])) for e in exc.value.errors()]


def test_a_minimal_caption_job_gets_a_uuid_and_the_documented_defaults() -> None:
    job = Job(media=["s3://media/cat.jpg"])
    assert len(job.id) == 36
    assert job.task == "caption"
    assert job.media[0].kind == "image"
    assert job.generation.model_dump() == {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "seed": None}
    assert job.video.num_frames == 32


def test_the_prompt_is_the_media_in_order_then_the_text() -> None:
    job = Job(task="qa", media=["s3://m/a.png", {"uri": "s3://m/b", "kind": "image"}], question="Same cat?")
    assert job.conversation() == [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": "s3://m/a.png"},
                {"type": "image", "url": "s3://m/b"},
                {"type": "text", "text": "Same cat?"},
            ],
        }
    ]


def test_caption_uses_the_default_prompt_unless_one_is_given() -> None:
    assert Job(media=["s3://m/a.jpg"]).conversation()[0]["content"][-1]["text"] == "Describe this image in detail."
    assert Job(media=["s3://m/a.mp4"]).conversation()[0]["content"][-1]["text"] == "Describe this video in detail."
    custom = Job(media=["s3://m/a.jpg"], prompt="One word.")
    assert custom.conversation()[0]["content"][-1]["text"] == "One word."


def test_generation_and_video_fields_may_be_given_at_the_top_level() -> None:
    job = Job.model_validate({"media": ["s3://m/a.mp4"], "max_new_tokens": 7, "seed": 3, "num_frames": 8})
    assert (job.generation.max_new_tokens, job.generation.seed, job.video.num_frames) == (7, 3, 8)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"media": ["ftp://m/a.jpg"]}, "media.0.uri"),
        ({"media": [{"uri": "s3://bucket-only", "kind": "image"}]}, "media.0.uri"),
        ({"media": ["s3://m/a.xyz"]}, "media.0"),
        ({"id": "has space", "media": ["s3://m/a.jpg"]}, "id"),
        ({"media": ["s3://m/a.jpg"], "generation": {"max_new_tokens": 0}}, "generation.max_new_tokens"),
        ({"media": ["s3://m/a.jpg"], "temperature": -1}, "generation.temperature"),
        ({"media": ["s3://m/a.mp4"], "video": {"start_s": 5, "end_s": 2}}, "video"),
        ({"media": ["s3://m/a.jpg"], "colour": "red"}, "colour"),
        ({"media": ["s3://m/a.jpg"], "question": "x" * 8001, "task": "qa"}, "question"),
    ],
)
def test_invalid_jobs_are_refused_naming_the_bad_field(payload: dict, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Job.model_validate(payload)
    assert error_fields(exc) == [field]


def test_a_question_job_without_a_question_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError, match='task "qa" needs "question"'):
        Job(task="qa", media=["s3://m/a.jpg"])


def test_caption_and_qa_need_media() -> None:
    with pytest.raises(ValidationError, match='task "caption" needs at least one item in "media"'):
        Job(task="caption")


def test_a_chat_job_takes_its_media_from_user_turns_and_must_end_with_a_user_turn() -> None:
    messages = [
        {"role": "user", "content": [{"type": "image", "url": "s3://m/a.jpg"}, {"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
    ]
    job = Job(task="chat", messages=messages)
    assert [(m.uri, m.kind) for m in job.all_media()] == [("s3://m/a.jpg", "image")]
    assert job.conversation()[1] == {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}
    with pytest.raises(ValidationError, match="must be a user turn"):
        Job(task="chat", messages=messages[:2])


def test_results_round_trip_through_json() -> None:
    result = JobResult(id="j1", status="failed", error={"code": "media_not_found", "message": "m", "retryable": False})
    assert JobResult.model_validate_json(result.model_dump_json()) == result
    assert result.ok is False


def test_the_result_key_is_the_prefix_and_the_job_id() -> None:
    settings = ClientSettings(results_prefix="out/vlmq/")
    assert settings.result_key("abc") == "out/vlmq/abc.json"


def test_the_producer_imports_without_torch_or_transformers() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from producer import Client, Job\n"
        "import producer.cli\n"
        "Client(broker_url='redis://127.0.0.1:1/0').celery\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
