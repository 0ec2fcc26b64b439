"""Fetch media from S3, https or local files and decode it: images with Pillow, videos with decord.

Runs in the task threads, so a job's I/O and decoding overlap the model's work on the previous batch.
Every failure becomes a coded `MediaError` for that job alone.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image, ImageOps, UnidentifiedImageError

from producer.jobs import Media, VideoSampling, split_s3_uri
from worker.errors import (
    DecodeHung,
    MediaError,
    MediaForbidden,
    MediaNotFound,
    MediaTooLarge,
    MediaUnavailable,
    MediaUndecodable,
    MediaUnsupported,
)
from worker.http_media import HttpFetcher
from worker.settings import WorkerSettings
from worker.watchdog import DeadlinePassed, call_with_deadline

# Plain raster formats only; Pillow's other plugins (EPS needs Ghostscript, ...) are never tried.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_FORBIDDEN_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
# Box types an ISO BMFF (MP4, MOV, M4V, 3GP) file starts with: `ftyp`, or for old QuickTime files one of the others.
_MP4_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"}

# Size limits are checked explicitly below (MediaTooLarge); Pillow's own warning would only add noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Video:
    """Sampled frames of one video: uint8 array (frames, height, width, 3), and the indices they came from."""

    frames: np.ndarray
    indices: list[int]
    fps: float


Decoded = Image.Image | Video


class MediaFetcher:
    """Reads media bytes from the sources this worker's settings allow."""

    def __init__(self, settings: WorkerSettings, s3_client: Any) -> None:
        self.settings = settings
        self.s3 = s3_client
        self.http = HttpFetcher(settings)

    def fetch(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            return self._fetch_s3(uri)
        if uri.startswith("file://"):
            return self._fetch_file(uri)
        if uri.startswith(("https://", "http://")):
            return self.http.fetch(uri)
        raise MediaForbidden(
            f"{uri.split(':', 1)[0]} media is not enabled on this worker; put the object in S3 and send s3://bucket/key"
        )

    def _fetch_s3(self, uri: str) -> bytes:
        bucket, key = split_s3_uri(uri)
        allowed = self.settings.allowed_buckets
        if allowed and bucket not in allowed:
            raise MediaForbidden(f"bucket {bucket!r} is not in this worker's VLMQ_ALLOWED_BUCKETS")
        limit = self.settings.max_media_bytes
        try:
            # The size comes with GetObject's headers, before any of the body is read: a HeadObject first would
            # cost a round trip per item and say the same. The body is read with a cap in case the header lies.
            response = self.s3.get_object(Bucket=bucket, Key=key)
            size = int(response.get("ContentLength") or 0)
            if size <= limit:
                data: bytes = response["Body"].read(limit + 1)
                size = len(data)
            response["Body"].close()
            if size > limit:
                raise MediaTooLarge(too_large(uri, size, limit))
            return data
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _NOT_FOUND_CODES or status == 404:
                raise MediaNotFound(f"{uri} does not exist; check the bucket and key") from None
            if code in _FORBIDDEN_CODES or status == 403:
                raise MediaForbidden(
                    f"access to {uri} was denied; give the worker's credentials s3:GetObject"
                ) from None
            raise MediaUnavailable(f"S3 error reading {uri}: {code or status}; it will be retried") from None
        except BotoCoreError as exc:
            raise MediaUnavailable(f"could not reach S3 for {uri}: {exc}; it will be retried") from None

    def _fetch_file(self, uri: str) -> bytes:
        if not self.settings.allow_local_files:
            raise MediaForbidden(
                "file:// media is disabled on this worker; set VLMQ_ALLOW_LOCAL_FILES=true to allow it"
            )
        path = Path(unquote(urlparse(uri).path))
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise MediaNotFound(f"{uri} is not a regular file")
            if size > self.settings.max_media_bytes:
                raise MediaTooLarge(too_large(uri, size, self.settings.max_media_bytes))
            return path.read_bytes()
        except FileNotFoundError:
            raise MediaNotFound(f"{uri} does not exist on the worker") from None
        except PermissionError:
            raise MediaForbidden(f"the worker may not read {uri}") from None


def too_large(uri: str, size: int, limit: int) -> str:
    return f"{uri} is {size:,} bytes, over the limit of {limit:,} (VLMQ_MAX_MEDIA_BYTES)"


def decode_image(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """Decode image bytes into an upright RGB image, refusing anything over `max_pixels`."""
    if not data:
        raise MediaUndecodable(f"{uri} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise MediaUndecodable(f"{uri} is not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError:
        raise MediaTooLarge(f"{uri} has too many pixels (VLMQ_MAX_IMAGE_PIXELS={max_pixels:,})") from None
    except Exception as exc:
        raise MediaUndecodable(f"{uri} could not be opened as an image: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise MediaTooLarge(f"{uri} is {width}x{height} pixels, over VLMQ_MAX_IMAGE_PIXELS={max_pixels:,}")
    try:
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image) or image)
    except Exception as exc:  # truncated or corrupt data surfaces here, with many exception types
        raise MediaUndecodable(f"{uri} is corrupt or truncated: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way a viewer shows it: transparency over white, 16-bit and float scaled, CMYK/palette converted."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def frame_indices(num_total: int, fps: float, sampling: VideoSampling) -> list[int]:
    """LLaVA-OneVision's (lmms-eval's) frame choice: `num_frames` indices spread evenly over the clip or window.

    `np.linspace(first, last, num_frames, dtype=int)`, where first/last are the first and last frame inside the
    window (`ceil(start_s * fps)`, `min(n - 1, floor(end_s * fps))`). A clip shorter than `num_frames` repeats
    indices.
    """
    if num_total <= 0:
        raise MediaUndecodable("the video has no frames")
    first, last = 0, num_total - 1
    if sampling.start_s is not None:
        first = math.ceil(sampling.start_s * fps)
    if sampling.end_s is not None:
        last = min(num_total - 1, math.floor(sampling.end_s * fps))
    if first > num_total - 1 or first > last:
        duration = num_total / fps if fps > 0 else 0.0
        raise MediaUnsupported(
            f"the time window {sampling.start_s}..{sampling.end_s} s holds no frame of this {duration:.2f} s video"
        )
    return [int(i) for i in np.linspace(first, last, sampling.num_frames, dtype=int)]


def video_container(data: bytes) -> str | None:
    """The container of video bytes by their first bytes: `mp4` (ISO BMFF / QuickTime), `matroska`, `avi`, or None.

    Sniffed here so that FFmpeg never probes anything else: its HLS and concat demuxers open the files and URLs a
    playlist names, so a playlist named `.mp4` must not reach it.
    """
    if len(data) >= 12 and data[4:8] in _MP4_FIRST_BOXES:
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def decode_video(data: bytes, uri: str, sampling: VideoSampling, settings: WorkerSettings) -> Video:
    """Decode the sampled frames of a video from memory with decord, after checking its container and limits."""
    import decord

    if not data:
        raise MediaUndecodable(f"{uri} is empty (0 bytes)")
    container = video_container(data)
    if container is None:
        raise MediaUnsupported(f"{uri} is not an MP4/MOV, Matroska/WebM or AVI video; re-encode it as H.264 in MP4")
    if container not in settings.video_containers:
        allowed = ", ".join(settings.video_containers)
        raise MediaUnsupported(
            f"{uri} is a {container} video; this worker opens only {allowed} (VLMQ_VIDEO_CONTAINERS)"
        )
    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        total, fps = len(reader), float(reader.get_avg_fps())
        check_video_limits(uri, total, fps, settings)
        height, width = reader.next().shape[:2]  # one frame tells the size; get_batch seeks back
        if width * height > settings.max_video_pixels:
            raise MediaTooLarge(
                f"{uri} is {width}x{height} pixels per frame, over VLMQ_MAX_VIDEO_PIXELS={settings.max_video_pixels:,}"
            )
        indices = frame_indices(total, fps, sampling)
        frames = reader.get_batch(indices).asnumpy()
    except MediaError:
        raise
    except Exception as exc:  # decord raises DECORDError / RuntimeError with FFmpeg's message
        raise MediaUndecodable(
            f"{uri} could not be decoded as a video ({exc}); check that it plays, or re-encode it as H.264 in MP4"
        ) from None
    return Video(frames=frames, indices=indices, fps=fps)


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


def load(
    fetcher: MediaFetcher,
    media: Media,
    sampling: VideoSampling,
    before_decode: Callable[[str], None] | None = None,
) -> Decoded:
    """Fetch and decode one media item; a video's decoding is bounded by VLMQ_MAX_DECODE_S.

    Raises:
        DecodeHung: the decoder did not return in time; it keeps its thread, so the worker should restart.
    """
    data = fetcher.fetch(media.uri)
    if media.kind == "image":
        return decode_image(data, media.uri, fetcher.settings.max_image_pixels)
    settings = fetcher.settings

    def decode() -> Video:
        if before_decode is not None:
            before_decode(media.uri)
        return decode_video(data, media.uri, sampling, settings)

    try:
        return call_with_deadline(decode, settings.max_decode_s, "vlmq-decode")
    except DeadlinePassed:
        raise DecodeHung(
            f"decoding {media.uri} did not finish within VLMQ_MAX_DECODE_S={settings.max_decode_s:g} s; the file may "
            "be malformed (check that it plays, or re-encode it as H.264 in MP4)"
        ) from None
