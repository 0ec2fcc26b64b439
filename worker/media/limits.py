"""The worker's limits on media: bytes per item, frames and seconds per video, items per job.

Each check runs before the expensive step it guards (reading a body, decoding frames, fetching a job's items) and
raises `MediaTooLarge`, or `MediaUndecodable` for a video that declares no usable frame rate.
"""

from __future__ import annotations

import math

from worker.errors import MediaTooLarge, MediaUndecodable
from worker.settings import WorkerSettings


def check_media_bytes(uri: str, size: int, settings: WorkerSettings) -> None:
    """Refuse an item whose size (stored, on disk, or declared by a server) is over VLMQ_MAX_MEDIA_BYTES."""
    if size > settings.max_media_bytes:
        raise MediaTooLarge.bytes(uri, size, settings.max_media_bytes)


def check_video_limits(uri: str, total_frames: int, fps: float, settings: WorkerSettings) -> None:
    """Refuse a video whose declared frame count or duration is over the worker's limits, before decoding it."""
    if total_frames > settings.max_video_frames:
        raise MediaTooLarge(
            f"{uri} has {total_frames:,} frames, over VLMQ_MAX_VIDEO_FRAMES={settings.max_video_frames:,}"
        )
    if not math.isfinite(fps) or fps <= 0:
        raise MediaUndecodable(f"{uri} declares no usable frame rate ({fps})")
    seconds = total_frames / fps
    if seconds > settings.max_video_seconds:
        raise MediaTooLarge(
            f"{uri} lasts {seconds:,.1f} s, over VLMQ_MAX_VIDEO_SECONDS={settings.max_video_seconds:,.0f}"
        )


def check_media_count(count: int, settings: WorkerSettings) -> None:
    """Refuse a job with more images and videos than the worker takes, before fetching any of them."""
    if count > settings.max_media_per_job:
        raise MediaTooLarge(
            f"the job has {count} images and videos, over VLMQ_MAX_MEDIA_PER_JOB={settings.max_media_per_job}; "
            "split it into several jobs"
        )
