"""Video, multi-image and multi-turn jobs through the queue return the model card code's text for each job alone."""

from __future__ import annotations

import io

from PIL import Image

from producer import Job
from tests.conftest import MEDIA_BUCKET, Stack
from tests.reference import encode, make_clip, random_image, reference_chat, video_frames

TOKENS = 10


def test_video_multi_image_and_chat_jobs_match_the_reference_when_batched(stack: Stack) -> None:
    s3 = stack.s3.client()
    clips = {
        "short.mp4": make_clip(frames=12, width=64, height=96, fps=6, seed=1),
        "mid.mp4": make_clip(frames=30, width=64, height=48, fps=10, seed=2),
        "long.mp4": make_clip(frames=55, width=96, height=64, fps=12, seed=3),
    }
    photos = {
        f"p{i}.png": encode(random_image(w, h, seed=10 + i), "PNG") for i, (w, h) in enumerate([(80, 60), (50, 90)])
    }
    for name, body in {**clips, **photos}.items():
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"kinds/{name}", Body=body)
    uri = {name: f"s3://{MEDIA_BUCKET}/kinds/{name}" for name in {**clips, **photos}}
    image = {name: Image.open(io.BytesIO(body)).convert("RGB") for name, body in photos.items()}

    def video_job(clip: str, num_frames: int, **fields) -> tuple[Job, str]:
        job = Job(media=[uri[clip]], num_frames=num_frames, max_new_tokens=TOKENS, **fields)
        return job, clip

    video_jobs = [
        video_job("mid.mp4", 8, task="qa", question="What moves?"),
        video_job("long.mp4", 8, task="caption"),
        video_job("short.mp4", 16, task="qa", question="Colours?"),  # 12 frames: indices repeat
        video_job("long.mp4", 8, task="qa", question="And here?", start_s=1.0, end_s=3.5),
    ]
    multi = Job(task="qa", media=[uri["p0.png"], uri["p1.png"]], question="Same scene?", max_new_tokens=TOKENS)
    chat = Job(
        task="chat",
        messages=[
            {"role": "user", "content": [{"type": "image", "url": uri["p1.png"]}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A noisy picture."}]},
            {"role": "user", "content": [{"type": "text", "text": "Which colours?"}]},
        ],
        max_new_tokens=TOKENS,
    )
    stack.start_worker("--max-batch-size", "4", "--max-wait-ms", "300")

    jobs = [job for job, _ in video_jobs] + [multi, chat]
    results = stack.client().run(jobs, progress=False, timeout=300)

    expected = []
    for job, clip in video_jobs:
        v = job.video
        frames = video_frames(clips[clip], v.num_frames, v.start_s, v.end_s)
        text = job.question or "Describe this video in detail."
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        expected.append(reference_chat(stack.model, conversation, [], [frames], TOKENS))
    multi_turn = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same scene?"}]}
    ]
    expected.append(reference_chat(stack.model, multi_turn, [image["p0.png"], image["p1.png"]], [], TOKENS))
    chat_turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A noisy picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colours?"}]},
    ]
    expected.append(reference_chat(stack.model, chat_turns, [image["p1.png"]], [], TOKENS))

    assert [r.status for r in results] == ["succeeded"] * len(jobs), [r.error for r in results]
    assert [r.text for r in results] == expected
    assert max(r.batch_size or 0 for r in results[:4]) > 1  # the 8-frame videos shared a batch


def test_a_time_window_past_the_end_of_a_clip_fails_with_a_coded_error(stack: Stack) -> None:
    stack.s3.client().put_object(Bucket=MEDIA_BUCKET, Key="kinds/w.mp4", Body=make_clip(10, 32, 32, 10, seed=4))
    stack.start_worker()
    job = Job(media=[f"s3://{MEDIA_BUCKET}/kinds/w.mp4"], num_frames=4, start_s=5.0, max_new_tokens=TOKENS)

    result = stack.client().submit(job).result(timeout=120)

    assert result.status == "failed"
    assert result.error is not None and result.error.code == "media_unsupported"
    assert "holds no frame of this 1.00 s video" in result.error.message
