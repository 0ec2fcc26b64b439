"""Image decoding (formats, limits, colour modes, orientation) and video frame choice."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from producer.core.jobs import VideoSampling
from tests.reference import make_clip
from worker.errors import MediaForbidden, MediaNotFound, MediaTooLarge, MediaUndecodable, MediaUnsupported
from worker.media.decode import decode_image, decode_video, frame_indices, video_container
from worker.media.limits import check_media_count
from worker.media.sources import MediaFetcher
from worker.settings import WorkerSettings


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_transparent_pixels_become_white_not_black() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    rgb = decode_image(encoded(image), "x.png", max_pixels=100)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (0, 0, 255)


def test_palette_16_bit_and_cmyk_images_become_the_rgb_a_viewer_shows() -> None:
    palette = Image.new("RGB", (2, 2), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert decode_image(encoded(palette), "p.png", 100).getpixel((0, 0)) == (10, 200, 30)
    sixteen = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert decode_image(encoded(sixteen), "g.png", 100).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert decode_image(encoded(cmyk, "JPEG"), "c.jpg", 100).getpixel((0, 0))[0] >= 250


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    upright = decode_image(encoded(image, "JPEG", exif=exif), "r.jpg", 100)
    assert upright.size == (4, 8)


def test_images_over_the_pixel_limit_are_refused_before_decoding() -> None:
    data = encoded(Image.new("RGB", (101, 100)))
    with pytest.raises(MediaTooLarge, match=r"101x100 pixels, over VLMQ_MAX_IMAGE_PIXELS=10,000"):
        decode_image(data, "big.png", max_pixels=10_000)
    assert decode_image(encoded(Image.new("RGB", (100, 100))), "ok.png", max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty"),
        (b"hello, not an image", "not an image in a supported format"),
        (encoded(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")[:1500], "corrupt or truncated"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image in a supported format"),
    ],
)
def test_undecodable_bytes_get_a_coded_error(data: bytes, message: str) -> None:
    with pytest.raises(MediaUndecodable, match=message):
        decode_image(data, "x.jpg", max_pixels=10**6)


def test_frame_indices_spread_evenly_over_the_clip() -> None:
    assert frame_indices(100, 25.0, VideoSampling(num_frames=5)) == [0, 24, 49, 74, 99]
    assert frame_indices(3, 25.0, VideoSampling(num_frames=5)) == [0, 0, 1, 1, 2]


def test_frame_indices_of_a_window_start_and_end_inside_it() -> None:
    # 10 fps, 100 frames: 2.05 s .. 5.0 s -> frames ceil(20.5)=21 .. floor(50)=50
    assert frame_indices(100, 10.0, VideoSampling(num_frames=4, start_s=2.05, end_s=5.0)) == [21, 30, 40, 50]
    assert frame_indices(100, 10.0, VideoSampling(num_frames=2, end_s=99.0)) == [0, 99]


def test_a_window_beyond_the_end_of_the_clip_is_a_coded_error() -> None:
    with pytest.raises(MediaUnsupported, match=r"holds no frame of this 10\.00 s video"):
        frame_indices(100, 10.0, VideoSampling(num_frames=4, start_s=12.0))


def test_local_files_are_refused_unless_enabled(tmp_path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(encoded(Image.new("RGB", (2, 2))))
    with pytest.raises(MediaForbidden, match="VLMQ_ALLOW_LOCAL_FILES=true"):
        MediaFetcher(WorkerSettings(), s3_client=None).fetch(path.as_uri())
    allowed = MediaFetcher(WorkerSettings(allow_local_files=True), s3_client=None)
    assert allowed.fetch(path.as_uri()) == path.read_bytes()
    with pytest.raises(MediaNotFound):
        allowed.fetch((tmp_path / "missing.png").as_uri())


def test_buckets_outside_the_allow_list_are_refused_before_any_request() -> None:
    fetcher = MediaFetcher(WorkerSettings(allowed_buckets=["media"]), s3_client=None)
    with pytest.raises(MediaForbidden, match="'private' is not in this worker's VLMQ_ALLOWED_BUCKETS"):
        fetcher.fetch("s3://private/a.jpg")


CLIP_30_FRAMES_64x48_10FPS = make_clip(frames=30, width=64, height=48, fps=10, seed=2)


def decode(data: bytes, num_frames: int = 4, **limits) -> list[int]:
    return decode_video(data, "v.mp4", VideoSampling(num_frames=num_frames), WorkerSettings(**limits)).indices


def test_video_containers_are_recognised_by_their_first_bytes() -> None:
    assert video_container(CLIP_30_FRAMES_64x48_10FPS) == "mp4"
    assert video_container(make_clip(4, 32, 32, 10, seed=1, codec="libvpx-vp9")) == "matroska"
    assert video_container(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    assert video_container(b"#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n") is None
    assert video_container(b"ffconcat version 1.0\nfile /etc/passwd\n") is None


@pytest.mark.parametrize(
    "data",
    [
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        b"ffconcat version 1.0\nfile /etc/passwd\n",
        bytes(range(256)) * 20,
    ],
    ids=["hls-playlist", "concat-playlist", "random-bytes"],
)
def test_playlists_and_other_non_containers_never_reach_ffmpeg(data: bytes) -> None:
    with pytest.raises(MediaUnsupported, match="is not an MP4/MOV, Matroska/WebM or AVI video"):
        decode(data)


def test_a_container_left_out_of_the_setting_is_refused() -> None:
    webm = make_clip(4, 32, 32, 10, seed=1, codec="libvpx-vp9")
    assert decode(webm, video_containers=["mp4", "matroska"]) == [0, 1, 2, 3]
    with pytest.raises(MediaUnsupported, match=r"is a matroska video; this worker opens only mp4 \(VLMQ_VIDEO"):
        decode(webm, video_containers=["mp4"])


@pytest.mark.parametrize(
    "data",
    [CLIP_30_FRAMES_64x48_10FPS[: len(CLIP_30_FRAMES_64x48_10FPS) // 2], CLIP_30_FRAMES_64x48_10FPS[:40], b""],
    ids=["half", "header-only", "empty"],
)
def test_truncated_videos_are_undecodable(data: bytes) -> None:
    with pytest.raises(MediaUndecodable):
        decode(data)


@pytest.mark.parametrize(
    ("limit", "at", "over", "message"),
    [
        ("max_video_frames", 30, 29, "has 30 frames, over VLMQ_MAX_VIDEO_FRAMES=29"),
        ("max_video_seconds", 3.0, 2.99, "lasts 3.0 s, over VLMQ_MAX_VIDEO_SECONDS=3"),
        ("max_video_pixels", 64 * 48, 64 * 48 - 1, "is 64x48 pixels per frame, over VLMQ_MAX_VIDEO_PIXELS=3,071"),
    ],
)
def test_video_limits_refuse_just_over_and_allow_just_at(limit: str, at: float, over: float, message: str) -> None:
    assert decode(CLIP_30_FRAMES_64x48_10FPS, **{limit: at}) == [0, 9, 19, 29]
    with pytest.raises(MediaTooLarge, match=re.escape(message)):
        decode(CLIP_30_FRAMES_64x48_10FPS, **{limit: over})


def test_jobs_with_more_media_than_the_worker_takes_are_refused() -> None:
    check_media_count(3, WorkerSettings(max_media_per_job=3))
    with pytest.raises(MediaTooLarge, match="the job has 4 images and videos, over VLMQ_MAX_MEDIA_PER_JOB=3"):
        check_media_count(4, WorkerSettings(max_media_per_job=3))


def test_local_files_over_the_byte_limit_are_refused_before_reading(tmp_path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"x" * 100)
    assert MediaFetcher(WorkerSettings(allow_local_files=True, max_media_bytes=100), None).fetch(path.as_uri())
    with pytest.raises(MediaTooLarge, match="is 100 bytes, over the limit of 99"):
        MediaFetcher(WorkerSettings(allow_local_files=True, max_media_bytes=99), None).fetch(path.as_uri())
