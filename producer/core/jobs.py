"""The wire contract: what producers send and what workers return, as JSON.

`Job` is the task argument of `vlmq.run`; `JobResult` is its return value (stored by Celery in Redis) and the JSON
object written to S3. Both are plain pydantic models, so any service can build or read them without vlmq.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TASK_NAME = "vlmq.run"
DEFAULT_CAPTION_PROMPT = "Describe this image in detail."
DEFAULT_VIDEO_CAPTION_PROMPT = "Describe this video in detail."
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_TEXT_CHARS = 8_000

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"})
URI_SCHEMES = ("s3://", "file://", "https://", "http://")

MediaKind = Literal["image", "video"]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


def _now() -> datetime:
    return datetime.now(UTC)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b.jpg` -> (`bucket`, `a/b.jpg`); `s3://bucket/prefix/` -> (`bucket`, `prefix/`)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def describe_invalid(exc: ValidationError, what: str = "job") -> str:
    """A pydantic validation error as one line naming each bad field: `media.0.uri: ...; question: ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or what}: {e['msg']}" for e in exc.errors())


def infer_kind(uri: str) -> MediaKind:
    """The media kind of a URI from its extension; raises ValueError when the extension says neither."""
    suffix = PurePosixPath(uri.split("?", 1)[0]).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    raise ValueError(
        f"cannot tell whether {uri!r} is an image or a video from its extension; "
        'give it as {"uri": ..., "kind": "image"} or {"uri": ..., "kind": "video"}'
    )


class Media(BaseModel):
    """One image or video, by URI (`s3://bucket/key`, `file:///path`, `https://...`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1, max_length=2048)
    kind: MediaKind

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"uri": value}
        if isinstance(value, dict) and value.get("kind") is None and isinstance(value.get("uri"), str):
            value = {**value, "kind": infer_kind(value["uri"])}
        return value

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        if not uri.startswith(URI_SCHEMES):
            raise ValueError(f"unsupported URI {uri!r}: use s3://bucket/key, file:///path or https://host/path")
        if uri.startswith("s3://") and "/" not in uri[len("s3://") :].strip("/"):
            raise ValueError(f"S3 URI {uri!r} names no key: use s3://bucket/key")
        return uri


class Generation(BaseModel):
    """Generation settings; jobs share a batch only when these are equal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)


class VideoSampling(BaseModel):
    """How frames are sampled from each video of the job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_frames: int = Field(32, ge=1, le=256)
    start_s: float | None = Field(None, ge=0.0)
    end_s: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _window(self) -> VideoSampling:
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be greater than start_s ({self.start_s})")
        return self


class MessagePart(BaseModel):
    """One part of a chat turn: text, or an image / video referenced by URL (the model card's message format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "image", "video"]
    text: Text | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _fields_match_type(self) -> MessagePart:
        if self.type == "text" and (self.text is None or self.url is not None):
            raise ValueError('a "text" part needs "text" and no "url"')
        if self.type != "text" and (self.url is None or self.text is not None):
            raise ValueError(f'an "{self.type}" part needs "url" and no "text"')
        return self


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["user", "assistant"]
    content: list[MessagePart] = Field(min_length=1, max_length=64)


class Job(BaseModel):
    """A captioning, question-answering or chat job over one or more images or videos.

    Example:
        >>> Job(task="qa", media=["s3://media/cat.jpg"], question="What colour is the cat?")
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: str(uuid.uuid4()), pattern=JOB_ID_PATTERN)
    task: Literal["caption", "qa", "chat"] = "caption"
    media: list[Media] = Field(default_factory=list, max_length=64)
    question: Text | None = None
    prompt: Text | None = None
    messages: list[Message] | None = Field(None, max_length=64)
    generation: Generation = Field(default_factory=lambda: Generation())
    video: VideoSampling = Field(default_factory=lambda: VideoSampling())
    metadata: dict[str, str] = Field(default_factory=dict)
    submitted_at: datetime | None = None
    batch: str | None = Field(None, pattern=JOB_ID_PATTERN, description="the named batch the job belongs to")
    ttl_s: float | None = Field(
        None, gt=0, description="seconds after submitted_at past which a worker fails the job `expired` unrun"
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_generation_fields(cls, data: Any) -> Any:
        """Accept `max_new_tokens=...` etc. at the top level, as DESIGN.md lists them, and nest them."""
        if not isinstance(data, dict):
            return data
        moved = {k: data[k] for k in Generation.model_fields if k in data}
        moved_video = {k: data[k] for k in VideoSampling.model_fields if k in data}
        if not moved and not moved_video:
            return data
        data = {k: v for k, v in data.items() if k not in moved and k not in moved_video}
        if moved:
            data["generation"] = {**dict(data.get("generation") or {}), **moved}
        if moved_video:
            data["video"] = {**dict(data.get("video") or {}), **moved_video}
        return data

    @model_validator(mode="after")
    def _task_fields(self) -> Job:
        if self.task == "chat":
            if not self.messages:
                raise ValueError('task "chat" needs "messages" (user/assistant turns ending with a user turn)')
            if self.messages[-1].role != "user":
                raise ValueError('the last of "messages" must be a user turn: the result is the next assistant turn')
            if self.media:
                raise ValueError('task "chat" takes its media from "messages"; leave "media" empty')
            for turn in self.messages:
                for part in turn.content:
                    if part.type != "text":
                        if turn.role != "user":
                            raise ValueError("media may appear only in user turns")
                        Media(uri=part.url or "", kind=part.type)  # validates the URL like any media URI
            return self
        if self.messages is not None:
            raise ValueError(f'"messages" belongs to task "chat", not "{self.task}"')
        if not self.media:
            raise ValueError(f'task "{self.task}" needs at least one item in "media"')
        if self.task == "qa" and self.question is None:
            raise ValueError('task "qa" needs "question"')
        if self.task == "caption" and self.question is not None:
            raise ValueError('"question" belongs to task "qa"; use "prompt" to change the caption prompt')
        return self

    def all_media(self) -> list[Media]:
        """Every media item of the job in prompt order (chat: in the order of the turns)."""
        if self.messages is None:
            return list(self.media)
        return [Media(uri=p.url or "", kind=p.type) for m in self.messages for p in m.content if p.type != "text"]

    def conversation(self) -> list[dict[str, Any]]:
        """The chat-template messages the model sees: media first, then the text (the model card's format)."""
        if self.messages is not None:
            return [
                {"role": m.role, "content": [p.model_dump(exclude_none=True) for p in m.content]} for m in self.messages
            ]
        if self.task == "qa":
            text = self.question
        else:
            only_videos = all(m.kind == "video" for m in self.media)
            text = self.prompt or (DEFAULT_VIDEO_CAPTION_PROMPT if only_videos else DEFAULT_CAPTION_PROMPT)
        content: list[dict[str, Any]] = [{"type": m.kind, "url": m.uri} for m in self.media]
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]


ErrorCode = Literal[
    "invalid_job",
    "media_not_found",
    "media_forbidden",
    "media_unsupported",
    "media_undecodable",
    "media_too_large",
    "media_unavailable",
    "out_of_memory",
    "inference_failed",
    "result_write_failed",
    "worker_lost",
    "expired",
    "cancelled",
    "internal",
]


class JobError(BaseModel):
    """Why a job failed: a stable code, a message that says what to do, and whether retrying can help."""

    code: ErrorCode
    message: str
    retryable: bool = False


class Timings(BaseModel):
    """Milliseconds spent in each stage of the job."""

    queued: float | None = None
    fetch: float = 0.0
    infer: float = 0.0


class Usage(BaseModel):
    """Token counts of a succeeded job: its prompt (media tokens included) and the tokens it generated."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class JobResult(BaseModel):
    """The one terminal outcome of a job, in Redis (Celery result) and in S3 (`<prefix><id>.json`)."""

    id: str
    status: Literal["succeeded", "failed"]
    text: str | None = None
    error: JobError | None = None
    model: str | None = None
    worker: str | None = None
    attempts: int = 1
    batch_size: int | None = None
    usage: Usage | None = None
    timings: Timings = Field(default_factory=Timings)
    metadata: dict[str, str] = Field(default_factory=dict)
    finished_at: datetime = Field(default_factory=_now)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"
