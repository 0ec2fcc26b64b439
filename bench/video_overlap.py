"""Video jobs/s through the full queue with and without overlap of video decoding and model work.

Both runs use the same worker settings except the number of jobs in flight:

- sequential: `--concurrency` = max batch size. Every task thread waits inside the batch while the model runs, so
  nothing is fetched or decoded meanwhile; decoding and model work take turns.
- overlap: `--concurrency` = 2 x max batch size (the default). While the model runs one batch, the other task
  threads fetch and decode the next one.

`--max-wait-ms` is long, so batches fill up to the maximum in both runs. The model loop's idle share comes from
the worker's own Prometheus counter (`vlmq_model_busy_seconds_total`) over the timed run.

    python bench/video_overlap.py [--jobs 64] [--batch 4] [--clip 320x240x120] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from producer import Client, ClientSettings, Job
from worker.devtools.local_services import free_port, start_worker

from common import ROOT, append_section, local_stack, machine

NUM_FRAMES = 8


def smooth_clip(frames: int, width: int, height: int, fps: int, seed: int) -> bytes:
    """H.264 MP4 of moving colour gradients with light noise: compresses and decodes like camera footage."""
    import av

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            planes = [
                x * 255 // width + 3 * t + base[0],
                y * 255 // height + 5 * t + base[1],
                (x + y) * 128 // (width + height) + 7 * t + base[2],
            ]
            image = np.stack(planes, axis=-1) % 256 + rng.integers(-8, 8, (height, width, 3))
            frame = av.VideoFrame.from_ndarray(np.clip(image, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def scrape(port: int) -> dict[str, float]:
    """The worker's unlabelled samples, by name."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


@dataclass
class Run:
    jobs_per_s: float
    model_busy: float  # share of the run's wall time the model loop ran batches
    mean_batch: float
    media_ms: float  # fetch + decode + processor per job
    model_ms_per_batch: float


def run(env: dict[str, str], model_dir: Path, uris: list[str], args: argparse.Namespace, in_flight: int) -> Run:
    queue = f"bench-video-{in_flight}"
    client = Client(ClientSettings(queue=queue))
    port = free_port()
    worker_args = ["--device", "cpu", "--max-batch-size", str(args.batch), "--max-wait-ms", "2000"]
    worker_args += ["--concurrency", str(in_flight), "--queue", queue, "--metrics-port", str(port)]
    worker = start_worker(model_dir, Path(args.work), *worker_args, env=env, name=f"worker-{in_flight}")

    def jobs(chosen: list[str]) -> list[Job]:
        fields = {"question": "What happens?", "num_frames": NUM_FRAMES, "max_new_tokens": args.max_new_tokens}
        return [Job(task="qa", media=[u], **fields) for u in chosen]

    try:
        client.run(jobs(uris[: 2 * args.batch]), progress=False, timeout=600)  # warm-up
        before = scrape(port)
        started = time.perf_counter()
        results = client.run(jobs(uris), progress=False, timeout=600, poll_interval_s=0.02)
        elapsed = time.perf_counter() - started
        after = scrape(port)
    finally:
        worker.stop()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]

    def delta(name: str) -> float:
        return after[name] - before[name]

    return Run(
        jobs_per_s=len(results) / elapsed,
        model_busy=delta("vlmq_model_busy_seconds_total") / elapsed,
        mean_batch=delta("vlmq_batch_size_sum") / delta("vlmq_batch_size_count"),
        media_ms=1000 * delta("vlmq_media_seconds_sum") / delta("vlmq_media_seconds_count"),
        model_ms_per_batch=1000 * delta("vlmq_model_seconds_sum") / delta("vlmq_model_seconds_count"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="max batch size of both runs")
    parser.add_argument("--clip", default="320x240x120", help="WIDTHxHEIGHTxFRAMES of each clip (30 fps)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--worker-torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    width, height, frames = (int(v) for v in args.clip.split("x"))

    from worker.devtools.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="vlmq-bench-") as tmp:
        args.work = tmp
        model_dir = make_tiny_model(Path(tmp) / "model")
        with local_stack(Path(tmp), VLMQ_TORCH_THREADS=str(args.worker_torch_threads)) as stack:
            uris = [stack.upload(f"v/{i:04d}.mp4", smooth_clip(frames, width, height, 30, i)) for i in range(args.jobs)]
            runs = {}
            for name, in_flight in (("sequential", args.batch), ("overlap", 2 * args.batch)):
                runs[name] = run(stack.env, model_dir, uris, args, in_flight)
                print(name, runs[name], flush=True)

    seq, over = runs["sequential"], runs["overlap"]
    lines = [
        "| run | jobs in flight | video jobs/s | vs sequential | model loop busy | mean batch | media ms/job | "
        "model ms/batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        in_flight = args.batch if name == "sequential" else 2 * args.batch
        lines.append(
            f"| {name} | {in_flight} | {r.jobs_per_s:.1f} | {r.jobs_per_s / seq.jobs_per_s:.2f}x | "
            f"{r.model_busy:.0%} | {r.mean_batch:.1f} | {r.media_ms:.0f} | {r.model_ms_per_batch:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    command = (
        f"python bench/video_overlap.py --jobs {args.jobs} --batch {args.batch} --clip {args.clip} "
        f"--max-new-tokens {args.max_new_tokens} --worker-torch-threads {args.worker_torch_threads}"
    )
    append_section(
        args.out,
        f"\n## Video jobs: overlap of decoding and model work ({datetime.now(UTC):%Y-%m-%d})\n\n"
        f"- machine: {machine()}, no GPU (CPU fp32)\n- command: `{command}`\n"
        f"- {args.jobs} H.264 clips of {width}x{height}, {frames} frames at 30 fps, {NUM_FRAMES} frames sampled per "
        f"job, qa with {args.max_new_tokens} new tokens, tiny model, max batch {args.batch}, max wait 2 s\n\n"
        f"{table}\n\nOverlap / sequential: {over.jobs_per_s / seq.jobs_per_s:.2f}x.\n",
    )


if __name__ == "__main__":
    main()
