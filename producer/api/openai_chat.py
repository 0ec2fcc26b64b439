"""OpenAI's chat completions and models routes, mapped onto vlmq chat jobs.

    POST /v1/chat/completions     one chat job on the interactive queue; answers OpenAI's `chat.completion`
    GET  /v1/models               the models the running workers serve (they announce them in Redis)

Accepted: `model` (reported back, not used for routing: a deployment serves one model), `messages` with roles
`user` and `assistant`, content as a string or parts `text`, `image_url` (s3://, https:// where the workers allow
it, data: URLs staged to S3) and `video_url`; `max_tokens` / `max_completion_tokens` -> `max_new_tokens` (default
128), `temperature`, `top_p`, `seed`; `n` = 1, `stream` false; `user`, `metadata`, `store` (ignored).
Refused with 400 (`unsupported_parameter`): `stream: true`, `n` > 1, `system` / `developer` / `tool` roles. Any
other field (tools, response_format, logprobs, stop, penalties, ...) is refused with 422 naming it.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from producer.api.errors import ApiError
from producer.api.media import Stager
from producer.api.services import Services, services
from producer.core.jobs import JOB_ID_PATTERN, Generation, Job, JobError, JobResult, MediaKind
from producer.core.served import served_models

router = APIRouter(prefix="/v1", tags=["openai"])
DEFAULT_MAX_TOKENS = Generation.model_fields["max_new_tokens"].default


class MediaURL(BaseModel):
    url: str = Field(min_length=1, description="s3://bucket/key, https://..., or data:<type>;base64,...")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted and ignored")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: MediaURL | None = None
    video_url: MediaURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that vlmq serves (others are refused, naming the field)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @property
    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


def _unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", message, param=param)


async def _part(part: ContentPart, param: str, stager: Stager) -> dict[str, Any]:
    if part.type == "text":
        if part.text is None:
            raise ApiError(400, "invalid_job", 'a "text" part needs "text"', param=f"{param}.text")
        return {"type": "text", "text": part.text}
    media = part.image_url if part.type == "image_url" else part.video_url
    where = f"{param}.{part.type}.url"
    if media is None:
        raise ApiError(400, "invalid_job", f'an "{part.type}" part needs "{part.type}": {{"url": ...}}', param=where)
    kind: MediaKind = "image" if part.type == "image_url" else "video"
    url = media.url
    if url.startswith("data:"):
        url = await stager.data_url(url, where, kind)
    else:
        await stager.check_uri(url, where)
    return {"type": kind, "url": url}


async def to_job(request: ChatRequest, stager: Stager, job_id: str, metadata: dict[str, str]) -> Job:
    """The chat job of a request (data: URL media staged to S3 first).

    Raises:
        ApiError: a refused field or media URL.
        pydantic.ValidationError: the conversation breaks the job contract.
    """
    if request.stream:
        raise _unsupported("stream=true is not supported: vlmq answers once the job has ended", "stream")
    if request.n not in (None, 1):
        raise _unsupported("n must be 1: one job gives one answer", "n")
    messages = []
    for i, message in enumerate(request.messages):
        if message.role not in ("user", "assistant"):
            raise _unsupported(
                f"role {message.role!r} is not supported: LLaVA-OneVision's chat jobs take user and assistant turns",
                f"messages.{i}.role",
            )
        content = message.content if message.content is not None else []
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = [await _part(p, f"messages.{i}.content.{j}", stager) for j, p in enumerate(content)]
        messages.append({"role": message.role, "content": parts})
    generation: dict[str, Any] = {"max_new_tokens": request.max_new_tokens}
    generation.update(
        {k: getattr(request, k) for k in ("temperature", "top_p", "seed") if getattr(request, k) is not None}
    )
    return Job.model_validate({"id": job_id, "task": "chat", "messages": messages, "metadata": metadata, **generation})


def failed_part(job: Job, error: JobError) -> str | None:
    """The request part a job's media error is about (`messages.0.content.1.image_url.url`): the part whose URL the
    worker's message names, or the only media part; None for other errors."""
    if not error.code.startswith("media_"):
        return None
    parts = [
        (f"messages.{i}.content.{j}.{part.type}_url.url", part.url or "")
        for i, message in enumerate(job.messages or ())
        for j, part in enumerate(message.content)
        if part.type != "text"
    ]
    named = [where for where, url in parts if url and url in error.message]
    if named:
        return named[0]
    return parts[0][0] if len(parts) == 1 else None


def completion(result: JobResult, created: int, max_new_tokens: int, model: str) -> dict[str, Any]:
    """OpenAI's `chat.completion` object of a succeeded job."""
    usage = result.usage
    prompt, generated = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
    return {
        "id": result.id,
        "object": "chat.completion",
        "created": created,
        "model": result.model or model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "finish_reason": "length" if generated >= max_new_tokens else "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated},
        "system_fingerprint": None,
    }


def _job_id(idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return f"chatcmpl-{uuid.uuid4().hex}"
    job_id = f"chatcmpl-{idempotency_key}"
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise ApiError(400, "invalid_request", "Idempotency-Key: letters, digits and . _ : - only", "Idempotency-Key")
    return job_id


@router.post("/chat/completions", summary="OpenAI chat completion (one vlmq chat job)")
async def chat_completions(
    request: ChatRequest,
    api: Annotated[Services, Depends(services)],
    idempotency_key: Annotated[str | None, Header(description="the same key again waits for the same job")] = None,
) -> dict[str, Any]:
    created = int(time.time())
    job = await to_job(request, api.stager, _job_id(idempotency_key), request.metadata or {})
    await api.submitter.send(job, "interactive")
    seen = await api.waiter.wait(job.id, api.settings.chat_timeout_s)
    if seen.result is None:
        raise ApiError(
            504, "timeout", f"job {job.id} has no result after {api.settings.chat_timeout_s:g} s; GET /jobs/{job.id}"
        )
    if not seen.result.ok and seen.result.error is not None:
        raise ApiError.from_job_error(seen.result.error, failed_part(job, seen.result.error))
    return completion(seen.result, created, request.max_new_tokens, api.settings.model)


@router.get("/models", summary="the models the running workers serve (OpenAI's list)")
async def models(api: Annotated[Services, Depends(services)]) -> dict[str, Any]:
    """Every model a running worker announced in the last minute (none while no worker runs)."""
    served = await run_in_threadpool(served_models, api.client.ledger.redis, api.client.ledger.keys)
    return {"object": "list", "data": [_model_entry(m) for m in served]}


@router.get("/models/{model_id:path}", summary="one model (OpenAI's retrieve)")
async def model(model_id: str, api: Annotated[Services, Depends(services)]) -> dict[str, Any]:
    served = await run_in_threadpool(served_models, api.client.ledger.redis, api.client.ledger.keys)
    if model_id not in served:
        raise ApiError(404, "model_not_found", f"no running worker serves {model_id!r}; they serve {served}", "model")
    return _model_entry(model_id)


def _model_entry(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "vlmq"}
