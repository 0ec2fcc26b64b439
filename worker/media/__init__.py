"""Media for a job: fetch each item's bytes, check them against the worker's limits, decode them.

Runs in the preprocessing processes (in the task threads with `--preprocess-workers 0`), so a job's I/O and
decoding overlap the model's work on earlier batches.
Every failure becomes a coded `MediaError` for that item's job alone.

- `sources`: `MediaFetcher` routes a URI to S3, a local file (opt-in) or `https.HttpFetcher`;
- `https`: the http(s) fetcher and its guard against reaching the worker's own network (SSRF);
- `decode`: images with Pillow, videos with decord (container sniffing, frame choice);
- `limits`: the size, frame, duration and item-count checks, run before the work they guard.

The modules import one way: `limits` <- `https`, `sources`, `decode` <- this package, which adds `load`.
"""

from __future__ import annotations

from collections.abc import Callable

from producer.core.jobs import Media, VideoSampling
from worker.errors import DecodeHung
from worker.media.decode import Decoded, Video, decode_image, decode_video, frame_indices, video_container
from worker.media.https import HttpFetcher
from worker.media.limits import check_media_bytes, check_media_count, check_video_limits
from worker.media.sources import MediaFetcher
from worker.watchdog import DeadlinePassed, call_with_deadline

__all__ = [
    "Decoded",
    "HttpFetcher",
    "MediaFetcher",
    "Video",
    "check_media_bytes",
    "check_media_count",
    "check_video_limits",
    "decode_image",
    "decode_video",
    "frame_indices",
    "load",
    "video_container",
]


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
