"""Decode media bytes: images with Pillow, videos with decord (only the sampled frames).

Each decoder checks the worker's pixel and video limits before the expensive work, and turns every failure into a
coded `MediaError` for that item alone.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from producer.core.jobs import VideoSampling
from worker.errors import MediaError, MediaTooLarge, MediaUndecodable, MediaUnsupported
from worker.media.limits import check_video_limits
from worker.settings import WorkerSettings

# Plain raster formats only; Pillow's other plugins (EPS needs Ghostscript, ...) are never tried.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
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


# What `load` returns for one item.
Decoded = Image.Image | Video


def decode_image(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """Decode image bytes into an upright RGB image, refusing anything over `max_pixels`."""
    if not data:
        raise MediaUndecodable.empty(uri)
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
        raise MediaUndecodable.empty(uri)
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
