"""Image decoding (formats, limits, colour modes, orientation) and video frame choice."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from producer.jobs import VideoSampling
from worker.errors import MediaForbidden, MediaNotFound, MediaTooLarge, MediaUndecodable, MediaUnsupported
from worker.media import MediaFetcher, decode_image, frame_indices
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
