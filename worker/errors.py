"""Errors a job can end with. Each has a stable `code` (the `JobError.code` users see) and says if retrying helps.

VlmqError
├── InvalidJob            invalid_job          the job JSON does not match the contract
├── MediaError
│   ├── MediaNotFound      media_not_found      the object or file does not exist
│   ├── MediaForbidden     media_forbidden      the source is not allowed (scheme, bucket, local files)
│   ├── MediaUnsupported   media_unsupported    a format or kind this worker does not decode
│   ├── MediaUndecodable   media_undecodable    the bytes are not a valid image / video
│   │   └── DecodeHung     media_undecodable    decoding passed VLMQ_MAX_DECODE_S (the worker restarts)
│   ├── MediaTooLarge      media_too_large      bytes or pixels over the configured limits
│   └── MediaUnavailable   media_unavailable    storage failed or throttled (retryable)
├── InferenceError         inference_failed     the model failed on this item
│   ├── OutOfMemory        out_of_memory        the item does not fit on the device even alone
│   └── PromptTooLong      inference_failed     prompt over the engine's max_model_len (vllm)
├── ResultWriteFailed      result_write_failed  the result could not be written to S3 (retryable)
├── WorkerLost             worker_lost          workers died running the job, VLMQ_MAX_CRASHES times
├── Expired                expired              the job waited in the queue longer than its ttl_s
└── Cancelled              cancelled            its batch was cancelled before the job started

Not job errors:
- DeviceFailed: the device broke (a sticky CUDA error) and the worker process must end.
- ConfigError: the worker cannot start with its settings (a missing package, a device that is not there);
  `vlmq worker` prints its message and exits 2 before it takes any message.
"""

from __future__ import annotations

from typing import ClassVar, Self

from producer.core.jobs import ErrorCode, JobError


class VlmqError(Exception):
    """Base of every error that ends (or retries) a job."""

    code: ClassVar[ErrorCode] = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_job_error(self) -> JobError:
        return JobError(code=self.code, message=self.message, retryable=self.retryable)


class InvalidJob(VlmqError):
    """The job JSON does not match the contract."""

    code = "invalid_job"


class MediaError(VlmqError):
    """A media item could not be used."""


class MediaNotFound(MediaError):
    """The object or file does not exist."""

    code = "media_not_found"


class MediaForbidden(MediaError):
    """The media source is not allowed by this worker's settings."""

    code = "media_forbidden"


class MediaUnsupported(MediaError):
    """A media format or kind this worker does not decode."""

    code = "media_unsupported"


class MediaUndecodable(MediaError):
    """The bytes are not a valid image or video."""

    code = "media_undecodable"

    @classmethod
    def empty(cls, uri: str) -> Self:
        """`uri` has no bytes at all."""
        return cls(f"{uri} is empty (0 bytes)")


class DecodeHung(MediaUndecodable):
    """Decoding did not finish within VLMQ_MAX_DECODE_S; the stuck decoder thread cannot be freed."""


class MediaTooLarge(MediaError):
    """The media is over a configured size limit."""

    code = "media_too_large"

    @classmethod
    def bytes(cls, uri: str, size: int, limit: int) -> Self:
        """`uri` is `size` bytes (stored, on disk or declared by the server), over VLMQ_MAX_MEDIA_BYTES=`limit`."""
        return cls(f"{uri} is {size:,} bytes, over the limit of {limit:,} (VLMQ_MAX_MEDIA_BYTES)")


class MediaUnavailable(MediaError):
    """Storage failed or throttled; the same request may succeed later."""

    code = "media_unavailable"
    retryable = True


class InferenceError(VlmqError):
    """The model failed on this item."""

    code: ClassVar[ErrorCode] = "inference_failed"


class OutOfMemory(InferenceError):
    """The item does not fit on the device even alone."""

    code = "out_of_memory"


class PromptTooLong(InferenceError):
    """The job's prompt (text plus media tokens) is longer than the engine takes (vllm's max_model_len)."""

    @classmethod
    def from_vllm(cls, reason: str) -> Self:
        return cls(
            f"the job's prompt is longer than the engine's max_model_len: {reason} Shorten the text, send fewer or "
            "smaller media, or raise VLMQ_MAX_MODEL_LEN (up to the model's context length)"
        )


class ResultWriteFailed(VlmqError):
    """The result could not be written to S3; retrying may succeed."""

    code = "result_write_failed"
    retryable = True


class WorkerLost(VlmqError):
    """Workers died while running the job, too many times: it is dead-lettered instead of run again."""

    code = "worker_lost"


class Expired(VlmqError):
    """The job was older than its time to live when a worker took it."""

    code = "expired"


class Cancelled(VlmqError):
    """The job's batch was cancelled before the job started."""

    code = "cancelled"


class DeviceFailed(Exception):
    """The device is in an unrecoverable state (e.g. a CUDA error other than out-of-memory): nothing more can run."""


class ConfigError(RuntimeError):
    """The worker's settings cannot work on this machine; the message says how to fix them (raised at start-up)."""
