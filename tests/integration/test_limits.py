"""A worker's limits through the queue: an input just over a limit fails with a coded error, one at it succeeds,
and corrupt or disguised videos fail alone while their batch-mates succeed."""

from __future__ import annotations

import io

from PIL import Image

from producer import Job
from tests.conftest import MEDIA_BUCKET, Stack
from tests.reference import encode, make_clip, random_image, reference_chat, video_frames

TOKENS = 8
HLS_PLAYLIST = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"


def test_limits_and_corrupt_videos_fail_alone_with_their_codes(stack: Stack) -> None:
    clip = make_clip(frames=30, width=64, height=48, fps=10, seed=2)  # the largest object: the byte limit
    objects = {
        "at-bytes.mp4": clip,
        "over-bytes.mp4": clip + b"\0",
        "over-frames.mp4": make_clip(frames=31, width=32, height=32, fps=10, seed=3),
        "over-pixels.mp4": make_clip(frames=4, width=64, height=64, fps=10, seed=4),
        "vp9.webm": make_clip(frames=12, width=56, height=32, fps=8, seed=5, codec="libvpx-vp9"),
        "truncated.mp4": clip[: len(clip) // 2],
        "random.mp4": bytes(range(256)) * 40,
        "playlist.mp4": HLS_PLAYLIST,
        "at-pixels.png": encode(random_image(80, 60, seed=6), "PNG"),
        "over-pixels.png": encode(random_image(81, 60, seed=7), "PNG"),
        "small.png": encode(random_image(40, 30, seed=8), "PNG"),
    }
    assert max(len(body) for body in objects.values()) == len(clip) + 1
    s3 = stack.s3.client()
    for name, body in objects.items():
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"limits/{name}", Body=body)
    uri = {name: f"s3://{MEDIA_BUCKET}/limits/{name}" for name in objects}
    limits = {
        "VLMQ_MAX_MEDIA_BYTES": str(len(clip)),
        "VLMQ_MAX_VIDEO_FRAMES": "30",
        "VLMQ_MAX_VIDEO_PIXELS": str(64 * 48),
        "VLMQ_MAX_IMAGE_PIXELS": str(80 * 60),
        "VLMQ_MAX_MEDIA_PER_JOB": "2",
    }
    # Checked in the preprocessing pool's processes (a limit's error crosses back as that job's coded error).
    stack.start_worker("--preprocess-workers", "2", "--max-batch-size", "4", "--max-wait-ms", "300", env=limits)

    def video(name: str) -> Job:
        return Job(task="qa", media=[uri[name]], question="What?", num_frames=8, max_new_tokens=TOKENS)

    def images(*names: str) -> Job:
        return Job(task="qa", media=[uri[n] for n in names], question="What?", max_new_tokens=TOKENS)

    cases = {
        "at-bytes.mp4": (video("at-bytes.mp4"), None),
        "over-bytes.mp4": (video("over-bytes.mp4"), "media_too_large"),
        "over-frames.mp4": (video("over-frames.mp4"), "media_too_large"),
        "over-pixels.mp4": (video("over-pixels.mp4"), "media_too_large"),
        "vp9.webm": (video("vp9.webm"), None),
        "truncated.mp4": (video("truncated.mp4"), "media_undecodable"),
        "random.mp4": (video("random.mp4"), "media_unsupported"),
        "playlist.mp4": (video("playlist.mp4"), "media_unsupported"),
        "at-pixels.png": (images("at-pixels.png"), None),
        "over-pixels.png": (images("over-pixels.png"), "media_too_large"),
        "two images": (images("small.png", "at-pixels.png"), None),
        "three images": (images("small.png", "at-pixels.png", "small.png"), "media_too_large"),
    }

    results = stack.client().run([job for job, _ in cases.values()], progress=False, timeout=300)

    codes = {name: (r.error.code if r.error else None) for name, r in zip(cases, results, strict=True)}
    assert codes == {name: code for name, (_, code) in cases.items()}
    messages = {name: r.error.message for name, r in zip(cases, results, strict=True) if r.error}
    assert (
        f"is {len(clip) + 1:,} bytes, over the limit of {len(clip):,} (VLMQ_MAX_MEDIA_BYTES)"
        in messages["over-bytes.mp4"]
    )
    assert "has 31 frames, over VLMQ_MAX_VIDEO_FRAMES=30" in messages["over-frames.mp4"]
    assert "is 64x64 pixels per frame, over VLMQ_MAX_VIDEO_PIXELS=3,072" in messages["over-pixels.mp4"]
    assert "is 81x60 pixels, over VLMQ_MAX_IMAGE_PIXELS=4,800" in messages["over-pixels.png"]
    assert "the job has 3 images and videos, over VLMQ_MAX_MEDIA_PER_JOB=2" in messages["three images"]

    def expected_video(name: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}]
        return reference_chat(stack.model, conversation, [], [video_frames(objects[name], 8)], TOKENS)

    def expected_images(*names: str) -> str:
        pictures = [Image.open(io.BytesIO(objects[n])).convert("RGB") for n in names]
        content = [*({"type": "image"} for _ in names), {"type": "text", "text": "What?"}]
        return reference_chat(stack.model, [{"role": "user", "content": content}], pictures, [], TOKENS)

    texts = {name: r.text for name, r in zip(cases, results, strict=True) if r.ok}
    assert texts == {
        "at-bytes.mp4": expected_video("at-bytes.mp4"),
        "vp9.webm": expected_video("vp9.webm"),
        "at-pixels.png": expected_images("at-pixels.png"),
        "two images": expected_images("small.png", "at-pixels.png"),
    }
    after = stack.client().submit(images("small.png")).result(timeout=120)
    assert (after.status, after.text) == ("succeeded", expected_images("small.png"))  # the worker carried on
