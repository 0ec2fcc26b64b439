"""vlmq's producer side: build jobs, submit them, collect results. Imports neither torch nor transformers.

Every error the producer raises on its own derives from `VlmqClientError` (see `producer/errors.py`); a job that
breaks the contract raises pydantic's `ValidationError`, as `Job(...)` does.
"""

from producer.batch import BatchHandle
from producer.client import Client, JobHandle
from producer.core.batches import BatchStatus
from producer.core.jobs import Generation, Job, JobError, JobResult, Media, Message, MessagePart, Timings, VideoSampling
from producer.core.ledger import DeadLetter
from producer.errors import (
    InvalidBatchName,
    InvalidManifest,
    MissingExtra,
    ResultTimeout,
    ResultWriteError,
    VlmqClientError,
)
from producer.manifest import read_manifest, validate_manifest
from producer.settings import ClientSettings

__all__ = [
    "BatchHandle",
    "BatchStatus",
    "Client",
    "ClientSettings",
    "DeadLetter",
    "Generation",
    "InvalidBatchName",
    "InvalidManifest",
    "Job",
    "JobError",
    "JobHandle",
    "JobResult",
    "Media",
    "Message",
    "MessagePart",
    "MissingExtra",
    "ResultTimeout",
    "ResultWriteError",
    "Timings",
    "VideoSampling",
    "VlmqClientError",
    "read_manifest",
    "validate_manifest",
]
