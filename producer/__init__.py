"""vlmq's producer side: build jobs, submit them, collect results. Imports neither torch nor transformers."""

from producer.client import Client, JobHandle
from producer.jobs import Generation, Job, JobError, JobResult, Media, Message, MessagePart, Timings, VideoSampling
from producer.settings import ClientSettings

__all__ = [
    "Client",
    "ClientSettings",
    "Generation",
    "Job",
    "JobError",
    "JobHandle",
    "JobResult",
    "Media",
    "Message",
    "MessagePart",
    "Timings",
    "VideoSampling",
]
