"""Bad input through one worker: each kind of malformed job, message or media ends with its own coded error, the
job sent right after it succeeds, and the worker process stays up throughout.

Prints one line per kind (kind, code) and the figures: kinds, coded errors, worker restarts, good jobs after each.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from botocore.exceptions import ClientError
from PIL import Image

from producer import Client, Job, JobResult
from producer.core.jobs import MAX_TEXT_CHARS, TASK_NAME
from tests.conftest import MEDIA_BUCKET, Stack
from tests.helpers import ALLOWED_HOST, SECRET_HOST, serve
from tests.reference import encode, make_clip, random_image

TOKENS = 4
MAX_MEDIA_BYTES = 100_000
MAX_IMAGE_PIXELS = 80 * 60
MAX_VIDEO_FRAMES = 100
HLS_PLAYLIST = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
GOOD_PNG = encode(random_image(40, 30, seed=1), "PNG")


def decompression_bomb() -> bytes:
    """A 20000x20000 1-bit PNG: 400 megapixels (1.2 GB as RGB) in about 50 kB."""
    return encode(Image.new("1", (20_000, 20_000)), "PNG")


def padded(data: bytes, size: int) -> bytes:
    """`data` with zeros appended up to `size` bytes (image decoders ignore what follows the image)."""
    return data + bytes(size - len(data))


def send_raw(client: Client, queue: str, payload: Any, task_id: str | None = None, serializer: str = "json") -> str:
    """Send `payload` as the job argument straight to the broker, past the client's validation; returns the id."""
    task_id = task_id or str(uuid.uuid4())
    client.celery.send_task(TASK_NAME, args=[payload], task_id=task_id, queue=queue, serializer=serializer)
    return task_id


def publish_body(client: Client, queue: str, body: bytes, content_type: str) -> str:
    """Publish a `vlmq.run` message with Celery's headers but `body` as its raw bytes; returns its task id."""
    task_id = str(uuid.uuid4())
    headers, properties, _, _ = client.celery.amqp.as_task_v2(task_id, TASK_NAME, args=[{}])
    with client.celery.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="",
            routing_key=queue,
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8",
            **properties,
        )
    return task_id


def wait_for(client: Client, job_id: str, deadline: float) -> JobResult | str:
    """The job's result, or why there is none by `deadline`."""
    try:
        return client.result(job_id, timeout=max(0.0, deadline - time.monotonic()))
    except (TimeoutError, ClientError) as exc:
        return f"no result ({type(exc).__name__}: {exc})"


def test_every_kind_of_bad_input_fails_with_its_code_and_the_worker_carries_on(stack: Stack) -> None:
    clip = make_clip(frames=30, width=32, height=32, fps=10, seed=2)  # 3 s
    jpeg = encode(random_image(64, 48, seed=3), "JPEG")
    objects = {
        "good.png": GOOD_PNG,
        "bomb.png": decompression_bomb(),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "png-as-video.mp4": GOOD_PNG,
        "over-pixels.png": encode(Image.new("RGB", (300, 300), (10, 200, 30)), "PNG"),
        "eps.png": EPS,
        "playlist.mp4": HLS_PLAYLIST,
        "many-frames.mp4": make_clip(frames=4 * MAX_VIDEO_FRAMES, width=16, height=16, fps=10, seed=4),
        "clip.mp4": clip,
        "random.mp4": np.random.default_rng(5).integers(0, 256, 30_000, dtype=np.uint8).tobytes(),
        "truncated.mp4": clip[: len(clip) // 2],
        "over-bytes.png": padded(GOOD_PNG, MAX_MEDIA_BYTES + 1),
    }
    assert max(len(body) for name, body in objects.items() if name != "over-bytes.png") <= MAX_MEDIA_BYTES
    s3 = stack.s3.client()
    for name, body in objects.items():
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"bad/{name}", Body=body)
    uri = {name: f"s3://{MEDIA_BUCKET}/bad/{name}" for name in objects}
    local_png = stack.workdir / "local.png"
    local_png.write_bytes(GOOD_PNG)

    with (
        serve(SECRET_HOST, {"/x.png": (200, {}, GOOD_PNG)}) as secret,
        serve(ALLOWED_HOST, {"/good.png": (200, {}, GOOD_PNG)}) as media_server,
    ):
        secret_url = f"http://{SECRET_HOST}:{secret.server_address[1]}/x.png"
        http_base = f"http://{ALLOWED_HOST}:{media_server.server_address[1]}"
        media_server.routes["/redirect.png"] = (302, {"Location": secret_url}, b"")
        limits = {
            "VLMQ_MAX_MEDIA_BYTES": str(MAX_MEDIA_BYTES),
            "VLMQ_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
            "VLMQ_MAX_VIDEO_FRAMES": str(MAX_VIDEO_FRAMES),
            "VLMQ_MAX_MEDIA_PER_JOB": "2",
            "VLMQ_ALLOWED_BUCKETS": json.dumps([MEDIA_BUCKET]),
            "VLMQ_ALLOW_HTTP_MEDIA": "true",
            "VLMQ_ALLOW_PLAIN_HTTP": "true",
            "VLMQ_HTTP_ALLOWED_NETWORKS": json.dumps([f"{ALLOWED_HOST}/32"]),
            "VLMQ_HTTP_TIMEOUT_S": "10",
        }
        worker = stack.start_worker("--max-batch-size", "4", "--max-wait-ms", "100", env=limits)
        client = stack.client()
        queue = stack.queue

        def job(*media: str | dict[str, str], **fields: Any) -> Callable[[], str]:
            built = Job(task="caption", media=list(media), max_new_tokens=TOKENS, **fields)
            return lambda: client.submit(built, priority="bulk").id  # one queue: each bad job before its good one

        def raw(payload: Any, **kwargs: Any) -> Callable[[], str]:
            return lambda: send_raw(client, queue, payload, **kwargs)

        good_job = {"task": "caption", "media": [uri["good.png"]], "max_new_tokens": TOKENS}
        cases: dict[str, tuple[str, Callable[[], str]]] = {
            "decompression bomb PNG (20000x20000)": ("media_too_large", job(uri["bomb.png"])),
            "truncated JPEG": ("media_undecodable", job(uri["truncated.jpg"])),
            "zero-byte .jpg": ("media_undecodable", job(uri["empty.jpg"])),
            "PNG named .mp4": ("media_unsupported", job(uri["png-as-video.mp4"])),
            "image over VLMQ_MAX_IMAGE_PIXELS": ("media_too_large", job(uri["over-pixels.png"])),
            "EPS named .png": ("media_undecodable", job(uri["eps.png"])),
            "HLS playlist named .mp4": ("media_unsupported", job(uri["playlist.mp4"], num_frames=4)),
            "video over VLMQ_MAX_VIDEO_FRAMES": ("media_too_large", job(uri["many-frames.mp4"], num_frames=4)),
            "bucket not allowed": ("media_forbidden", job(f"s3://other-{MEDIA_BUCKET}/bad/good.png")),
            "URL of a private address": ("media_forbidden", job(secret_url)),
            "redirect to a private address": ("media_forbidden", job(f"{http_base}/redirect.png")),
            "job JSON breaking the contract": ("invalid_job", raw({"task": "caption", "media": 5})),
            # A pickled plain dict: harmless if loaded, but a JSON-only worker must refuse it without loading it.
            "pickle message": ("invalid_job", raw(good_job, serializer="pickle")),
            "message body not JSON": (
                "invalid_job",
                lambda: publish_body(client, queue, b'{"task": "caption", "media": [', "application/json"),
            ),
            "prompt over MAX_TEXT_CHARS": ("invalid_job", raw({**good_job, "prompt": "x" * (MAX_TEXT_CHARS + 1)})),
            "missing object": ("media_not_found", job(f"s3://{MEDIA_BUCKET}/bad/nope.png")),
            "file:// with local files off": ("media_forbidden", job(f"file://{local_png}")),
            "media over VLMQ_MAX_MEDIA_PER_JOB": ("media_too_large", job(*[uri["good.png"]] * 3)),
            "time window past the end": ("media_unsupported", job(uri["clip.mp4"], num_frames=4, start_s=10.0)),
            "random bytes named .mp4": ("media_unsupported", job(uri["random.mp4"], num_frames=4)),
            "truncated MP4": ("media_undecodable", job(uri["truncated.mp4"], num_frames=4)),
            "object over VLMQ_MAX_MEDIA_BYTES": ("media_too_large", job(uri["over-bytes.png"])),
            "job id ../../etc": ("invalid_job", raw(good_job, task_id="../../etc")),
            "HTTP 404 on an allowed network": ("media_not_found", job(f"{http_base}/nope.png")),
        }

        sent: dict[str, tuple[str, str]] = {}  # kind -> (bad job id, id of the good job sent right after it)
        http_kinds = {"URL of a private address", "redirect to a private address", "HTTP 404 on an allowed network"}
        for kind, (_, send) in cases.items():
            good_uri = f"{http_base}/good.png" if kind in http_kinds else uri["good.png"]  # the same image
            sent[kind] = (send(), client.submit(Job(media=[good_uri], max_new_tokens=TOKENS), priority="bulk").id)
        goods = dict(
            zip(cases, client.collect([g for _, g in sent.values()], progress=False, timeout=300), strict=True)
        )
        deadline = time.monotonic() + 30  # every good job is done: a bad one sent before it has had its turn
        bads = {kind: wait_for(client, bad, deadline) for kind, (bad, _) in sent.items()}
        secret_requests = list(secret.requests)

    def outcome(result: JobResult | str) -> tuple[str, str | None, bool | None]:
        """(status, error code, retryable), or (why there is no result, None, None)."""
        if isinstance(result, str):
            return result, None, None
        return result.status, result.error and result.error.code, result.error and result.error.retryable

    outcomes = {kind: outcome(result) for kind, result in bads.items()}
    results = {kind: result for kind, result in bads.items() if isinstance(result, JobResult)}
    log = worker.log_path.read_text(errors="replace")
    restarts = log.count("loaded model") - 1
    coded = sum(1 for kind, got in outcomes.items() if got == ("failed", cases[kind][0], False))
    good_after = sum(1 for result in goods.values() if result.ok)
    print()
    for kind, (status, code, _) in outcomes.items():
        print(f"{kind:<40} {code or status}")
    print(
        f"bad input: {len(cases)} kinds, {coded} coded errors, worker restarts {restarts}, "
        f"good jobs after each {good_after}/{len(cases)} succeeded"
    )

    assert outcomes == {kind: ("failed", code, False) for kind, (code, _) in cases.items()}
    assert {kind: (r.id, r.attempts) for kind, r in results.items()} == {
        kind: (sent[kind][0], 1) for kind in results
    }  # each under its own id, none retried
    assert {kind: r.status for kind, r in goods.items()} == {kind: "succeeded" for kind in cases}
    assert secret_requests == []  # the worker never reached the private address, not even through the redirect
    assert worker.proc.poll() is None and restarts == 0 and len(stack.workers) == 1
    names = {r.worker for r in [*goods.values(), *results.values()]}
    assert names == {f"{socket.gethostname()}:{worker.proc.pid}"}  # every job ran in the one process started
