"""The official `openai` Python SDK against a real `vlmq api`, a worker on the tiny model, Redis and SeaweedFS: chat
completions answer exactly what the model card's code answers for the same conversation, and a Batch API run ends
with OpenAI's output and error files."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.apiserver import Api, module_stack, start_api
from tests.conftest import MEDIA_BUCKET, Stack
from tests.helpers import count_in_logs
from tests.reference import encode, make_clip, random_image, reference_chat, video_frames

__all__ = ["module_stack"]  # the fixture, used by name

TOKENS = 6
QUESTION = "What breed is this cat?"


@pytest.fixture(scope="module")
def api(module_stack: Stack) -> Iterator[Api]:
    module_stack.start_worker("--max-batch-size", "4")
    server = start_api(module_stack)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sdk(api: Api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=api.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def cat(module_stack: Stack) -> tuple[str, bytes]:
    body = encode(random_image(40, 30, seed=7), "PNG")
    module_stack.s3.client().put_object(Bucket=MEDIA_BUCKET, Key="openai/cat.png", Body=body)
    return f"s3://{MEDIA_BUCKET}/openai/cat.png", body


def expected(stack: Stack, turns: list[dict[str, Any]], images: list[bytes], tokens: int = TOKENS) -> str:
    from PIL import Image

    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    return reference_chat(stack.model, turns, pictures, [], tokens)


def image_turn(text: str) -> dict[str, Any]:
    """The model card's user turn: the image, then the text."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def test_a_chat_completion_with_an_s3_image_answers_the_model_cards_text(
    module_stack: Stack, sdk: openai.OpenAI, cat: tuple[str, bytes]
) -> None:
    uri, body = cat
    response = sdk.chat.completions.create(
        model="llava-onevision",
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": QUESTION}],
            }
        ],
        max_tokens=TOKENS,
    )
    text = expected(module_stack, [image_turn(QUESTION)], [body])
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == text
    assert response.model == str(module_stack.model)
    assert response.usage is not None
    assert response.choices[0].finish_reason == ("length" if response.usage.completion_tokens == TOKENS else "stop")
    assert 0 < response.usage.completion_tokens <= TOKENS
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_a_chat_completion_with_a_data_url_image_answers_the_same_text(
    module_stack: Stack, sdk: openai.OpenAI, cat: tuple[str, bytes]
) -> None:
    _, body = cat
    data_url = "data:image/png;base64," + base64.b64encode(body).decode()
    response = sdk.chat.completions.create(
        model="llava-onevision",
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": QUESTION}],
            }
        ],
        max_completion_tokens=TOKENS,
    )
    assert response.choices[0].message.content == expected(module_stack, [image_turn(QUESTION)], [body])


def test_a_multi_turn_chat_answers_the_model_cards_next_turn(
    module_stack: Stack, sdk: openai.OpenAI, cat: tuple[str, bytes]
) -> None:
    uri, body = cat
    response = sdk.chat.completions.create(
        model="llava-onevision",
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": QUESTION}],
            },
            {"role": "assistant", "content": "A tabby."},
            {"role": "user", "content": "What colour are its eyes?"},
        ],
        max_tokens=TOKENS,
        temperature=0,
        seed=3,
    )
    turns = [
        image_turn(QUESTION),
        {"role": "assistant", "content": [{"type": "text", "text": "A tabby."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour are its eyes?"}]},
    ]
    assert response.choices[0].message.content == expected(module_stack, turns, [body])


def test_an_idempotency_key_makes_a_retried_request_wait_for_the_same_job(
    module_stack: Stack, sdk: openai.OpenAI, cat: tuple[str, bytes]
) -> None:
    uri, body = cat
    messages: Any = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Hi?"}]}
    ]
    key = {"Idempotency-Key": "retry-me-1"}
    first = sdk.chat.completions.create(model="m", messages=messages, max_tokens=TOKENS, extra_headers=key)
    again = sdk.chat.completions.create(model="m", messages=messages, max_tokens=TOKENS, extra_headers=key)
    assert first.id == again.id == "chatcmpl-retry-me-1"
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content == expected(module_stack, [image_turn("Hi?")], [body])
    assert count_in_logs(module_stack, r"job (chatcmpl-retry-me-1) finished")["chatcmpl-retry-me-1"] == 1


def test_a_video_url_part_is_a_video_job_answering_the_model_cards_text(
    module_stack: Stack, sdk: openai.OpenAI
) -> None:
    clip = make_clip(12, 32, 24, 4, seed=1)
    module_stack.s3.client().put_object(Bucket=MEDIA_BUCKET, Key="openai/clip.mp4", Body=clip)
    content: Any = [
        {"type": "video_url", "video_url": {"url": f"s3://{MEDIA_BUCKET}/openai/clip.mp4"}},
        {"type": "text", "text": "What happens?"},
    ]
    response = sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}], max_tokens=TOKENS
    )
    turn = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}
    frames = video_frames(clip, 32)  # the contract's default num_frames; 12 frames give repeated indices
    assert response.choices[0].message.content == reference_chat(module_stack.model, [turn], [], [frames], TOKENS)


def test_stream_true_is_refused_with_a_clear_400(sdk: openai.OpenAI, cat: tuple[str, bytes]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=TOKENS
        )
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "stream=true is not supported: vlmq answers once the job has ended",
        "type": "invalid_request_error",
        "param": "stream",
        "code": "unsupported_parameter",
    }


def test_models_lists_the_model_the_running_worker_serves_as_completions_report_it(
    sdk: openai.OpenAI, module_stack: Stack, cat: tuple[str, bytes]
) -> None:
    image = {"type": "image_url", "image_url": {"url": cat[0]}}
    answer = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": [image]}], max_tokens=1)

    assert [m.id for m in sdk.models.list()] == [answer.model] == [str(module_stack.model)]
    assert sdk.models.retrieve(str(module_stack.model)).id == str(module_stack.model)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    assert caught.value.body["param"] == "model"  # type: ignore[index]


def test_a_missing_image_fails_the_completion_naming_its_part(sdk: openai.OpenAI, cat: tuple[str, bytes]) -> None:
    missing = f"s3://{MEDIA_BUCKET}/openai/not-there.png"
    content = [{"type": "text", "text": "Which?"}, {"type": "image_url", "image_url": {"url": missing}}]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=TOKENS)
    assert caught.value.body == {
        "message": f"{missing} does not exist; check the bucket and key",
        "type": "invalid_request_error",
        "param": "messages.0.content.1.image_url.url",
        "code": "media_not_found",
    }


def batch_lines(uris: list[str]) -> list[dict[str, Any]]:
    """20 requests: 18 good, one naming a missing object (line 6), one with an invalid body (line 13)."""
    lines = []
    for i in range(20):
        url = f"s3://{MEDIA_BUCKET}/openai/missing.png" if i == 5 else uris[i % len(uris)]
        body: dict[str, Any] = {
            "model": "llava-onevision",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"Q{i}?"}],
                }
            ],
            "max_tokens": TOKENS,
        }
        if i == 12:
            body["max_tokens"] = -1
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines


def test_a_batch_of_20_with_2_bad_requests_completes_with_18_outputs_and_2_errors(
    module_stack: Stack, sdk: openai.OpenAI
) -> None:
    s3 = module_stack.s3.client()
    images = [encode(random_image(40, 30, seed=100 + i), "PNG") for i in range(3)]
    uris = []
    for i, body in enumerate(images):
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"openai/batch-{i}.png", Body=body)
        uris.append(f"s3://{MEDIA_BUCKET}/openai/batch-{i}.png")
    lines = batch_lines(uris)
    upload = sdk.files.create(
        file=("requests.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode()), purpose="batch"
    )
    assert sdk.files.retrieve(upload.id).filename == "requests.jsonl"
    assert upload.id in [f.id for f in sdk.files.list()]
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating"  # its lines become jobs after the answer
    deadline = time.monotonic() + 300
    while batch.status in ("validating", "in_progress", "finalizing"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (20, 18, 2)
    assert batch.id in [b.id for b in sdk.batches.list()]

    assert batch.output_file_id and batch.error_file_id
    outputs = [json.loads(line) for line in sdk.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in sdk.files.content(batch.error_file_id).text.splitlines()]
    good = [i for i in range(20) if i not in (5, 12)]
    assert [o["custom_id"] for o in outputs] == [f"req-{i}" for i in good]
    for i, output in zip(good, outputs, strict=True):
        assert output["error"] is None
        assert output["response"]["status_code"] == 200
        body = output["response"]["body"]
        assert body["object"] == "chat.completion"
        want = expected(module_stack, [image_turn(f"Q{i}?")], [images[i % 3]])
        assert body["choices"][0]["message"]["content"] == want, f"req-{i}"

    assert sdk.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(upload.id)
    assert [e["custom_id"] for e in errors] == ["req-5", "req-12"]
    assert [e["response"]["status_code"] for e in errors] == [400, 422]
    assert errors[0]["response"]["body"]["error"]["code"] == "media_not_found"
    assert errors[1]["response"]["body"]["error"]["code"] == "invalid_job"
    assert errors[1]["response"]["body"]["error"]["param"] == "max_tokens"
