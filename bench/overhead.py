"""What one worker process costs per job apart from the model: the real `vlmq worker` with the no-op engine.

The worker (a `vlmq worker` subprocess, `VLMQ_FAULTS='{"noop_engine": ...}'`, worker/devtools/noop_engine.py) does
all its per-job work for real: takes the message from Redis, reads the image from SeaweedFS (S3), decodes it with
Pillow, runs the checkpoint's processor (chat template, tokenizer, image processor), then writes the result to S3
and Redis and acknowledges; only the model is skipped (a fixed text at once). The processor is the 0.5B model's (384
px crops, anyres_max_9 over the hub's 36 grids; `--processor tiny`: the tiny test model's 32 px crops), written here
without weights.

Two workloads, one after the other on the same warm worker: `jpeg` (640x480 JPEGs, smooth synthetic photos) and
`png` (64x48 PNGs), under each configuration in `--configs` (CONFIGS: the preprocessing pool off or on, and the
allocators), one worker per configuration, side by side in one run. Each workload runs twice:

1. measured: jobs/s (wall time from the first submission to the last result) and CPU per job of each process,
   from psutil (user + system, before/after): the worker's engine process, its preprocessing processes (its
   children), redis-server and SeaweedFS. This bench process (the producer: submitting and polling) is shown but
   is not the worker's cost.
2. sampled (when py-spy is installed, `pip install py-spy`): the same jobs again under `py-spy record --gil
   --nonblocking` at 100 Hz on the engine process, which reads its Python stacks without pausing it and keeps, at
   each tick, the stack of the thread holding the GIL (nothing when no thread holds it). Each sample goes to the
   stage of the innermost frame on its stack that names one in STAGES (a sample in redis-py under the ledger is
   the ledger's, one in kombu under vlmq's intake is Celery's); a stage's GIL ms per job is its samples x 10 ms /
   jobs. The GIL is what caps one process at about one core, so that is the split that matters; its CPU outside
   the GIL (measured CPU - GIL time: native code that releases it) is a row of its own. (Without --gil, py-spy
   also counts threads waiting for the GIL as active: 3-4x the measured CPU here, so that mode cannot split CPU.)

    python bench/overhead.py [--label after] [--configs 'in-process; default'] [--jobs 400] [--concurrency 32]
                             [--processor 0.5b] [--keep-raw DIR] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from producer import Client, ClientSettings, Job
from producer.core.jobs import Generation
from worker.devtools.local_services import Service, start_worker

from common import ROOT, append_section, local_stack, machine

FIXED_TEXT = "noop"
LIB = "/usr/lib/x86_64-linux-gnu"
# Worker configurations, run one after the other on the same machine and media: (flags, environment).
CONFIGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "in-process": (["--preprocess-workers", "0"], {"VLMQ_ALLOCATOR": "system"}),  # as before issue 14
    "pool-system": ([], {"VLMQ_ALLOCATOR": "system"}),
    "pool-glibc": ([], {"VLMQ_ALLOCATOR": "glibc"}),
    "pool-jemalloc": ([], {"VLMQ_ALLOCATOR": "system", "LD_PRELOAD": f"{LIB}/libjemalloc.so.2"}),
    "pool-tcmalloc": ([], {"VLMQ_ALLOCATOR": "tcmalloc"}),
    "default": ([], {}),  # the pool, VLMQ_ALLOCATOR=auto
}
SAMPLE_HZ = 100
VLMQ = f"{ROOT}/"  # py-spy --full-filenames: frames name their file by its path
# (stage, a frame that puts a sample in it): the innermost frame that matches decides; within one frame, the first
# entry that matches (the processor's `prepare` frame is also a frame of worker/).
STAGES = [
    ("processor (chat template, tokenizer, image processor)", "prepare (" + VLMQ + "worker/engines/hf_model.py"),
    ("decode (Pillow, to RGB)", "decode_image (" + VLMQ + "worker/media/decode.py"),
    ("S3 GetObject of the image", "_fetch_s3 (" + VLMQ + "worker/media/sources.py"),
    ("the pool's hand-over (pipes, unpickling, shared memory, dispatch)", "(" + VLMQ + "worker/pool.py"),
    ("S3 PutObject of the result", "write (" + VLMQ + "producer/core/results.py"),
    ("job ledger in Redis (started, finished)", VLMQ + "producer/core/ledger.py"),
    ("rest of vlmq's per-job code (intake, validation, metrics, logging)", "(" + VLMQ + "worker/"),
    ("Celery and kombu (messages, acks, result backend, pool)", "/celery/"),
    ("Celery and kombu (messages, acks, result backend, pool)", "/kombu/"),
]
KEEP_RAW: Path | None = None  # --keep-raw: where py-spy's raw stacks stay after the run
OTHER = "other (metrics and health servers, logging, threads outside a job)"


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth synthetic photo: coarse noise upscaled bicubic plus fine grain (noise alone makes outsized JPEGs)."""
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def make_media(n: int) -> dict[str, list[bytes]]:
    """`n` 640x480 JPEGs (quality 90) and `n` 64x48 PNGs, all different (deterministic)."""
    rng = np.random.default_rng(0)
    out: dict[str, list[bytes]] = {"jpeg": [], "png": []}
    for _ in range(n):
        for kind, (w, h), fmt in (("jpeg", (640, 480), "JPEG"), ("png", (64, 48), "PNG")):
            buf = io.BytesIO()
            photo(rng, w, h).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            out[kind].append(buf.getvalue())
    return out


def write_processor(out: Path, preset: str) -> Path:
    """A checkpoint directory with the processor and config of `preset` and no weights (the no-op engine's need)."""
    from worker.devtools import tiny

    if preset == "tiny":
        tiny.make_tiny_model(out)
        return out
    out.mkdir(parents=True)
    tokenizer = tiny.build_tokenizer(pad_vocab_to=tiny.QWEN2_SPECIAL_IDS["<|endoftext|>"])
    config = tiny.config_0_5b()
    config.save_pretrained(out)
    pinpoints = config.image_grid_pinpoints
    tiny._save_processor(out, tokenizer, pinpoints, tiny.IMAGE_SIZE_0_5B, tiny.PATCH_SIZE_0_5B, tiny.SIGLIP_MEAN_STD)
    return out


def cpu_s(proc: psutil.Process, with_children: bool = True) -> float:
    """User + system CPU seconds of a process (and of its live children)."""
    procs = [proc, *(proc.children(recursive=True) if with_children else [])]
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


ENGINE = "worker: engine process"
POOL = "worker: preprocessing processes"
PRODUCER = "producer (this bench)"


def processes(worker: Service) -> dict[str, psutil.Process]:
    """The worker, redis-server and SeaweedFS (children of this process), and this process (the producer)."""
    me = psutil.Process()
    found = {ENGINE: psutil.Process(worker.proc.pid), POOL: psutil.Process(worker.proc.pid), PRODUCER: me}
    for child in me.children():
        name = " ".join(child.cmdline()[:1])
        if "redis-server" in name:
            found["redis-server"] = child
        elif name.endswith("weed"):
            found["SeaweedFS"] = child
    return found


def cpu_now(procs: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds so far of each; the engine process alone, its children (the pool) as the pool's."""
    now = {name: cpu_s(p, with_children=name not in (PRODUCER, ENGINE)) for name, p in procs.items()}
    now[POOL] -= now[ENGINE]
    return now


@dataclass
class Pass:
    """One workload's measured pass, and the stage samples of its sampled pass."""

    jobs: int
    seconds: float
    cpu_ms: dict[str, float]  # per job, by process
    samples: Counter[str] = field(default_factory=Counter)
    sampled_s: float = 0.0  # wall time of the sampled pass's jobs

    @property
    def worker_ms(self) -> float:
        return self.cpu_ms[ENGINE] + self.cpu_ms[POOL]

    def gil_ms(self, stage: str | None = None) -> float:
        """Ms per job the GIL was held, in `stage` or in all."""
        n = sum(self.samples.values()) if stage is None else self.samples[stage]
        return 1000 * n / SAMPLE_HZ / self.jobs

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds


def run_jobs(client: Client, uris: list[str]) -> float:
    """Seconds to run one job per uri through the queue; every job must return the fixed text."""
    generation = Generation(max_new_tokens=16)
    jobs = [Job(media=[u], prompt="Describe this image.", generation=generation) for u in uris]
    started = time.perf_counter()
    results = client.run(jobs, progress=False, timeout=900, poll_interval_s=0.05)
    seconds = time.perf_counter() - started
    wrong = [r.error or r.text for r in results if not r.ok or r.text != FIXED_TEXT]
    assert not wrong, f"{len(wrong)} jobs did not return {FIXED_TEXT!r}, e.g. {wrong[:3]}"
    return seconds


def measure(client: Client, procs: dict[str, psutil.Process], uris: list[str]) -> Pass:
    before = cpu_now(procs)
    seconds = run_jobs(client, uris)
    after = cpu_now(procs)
    return Pass(len(uris), seconds, {k: 1000 * (after[k] - before[k]) / len(uris) for k in after})


def stage_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for stage, marker in STAGES:
            if marker in frame:
                return stage
    return OTHER


def sample(client: Client, pid: int, uris: list[str], work: Path) -> tuple[Counter[str], float]:
    """Samples per stage of the worker's running threads while it runs `uris` (py-spy, see the module docstring)."""
    raw = (KEEP_RAW or work) / f"py-spy-{time.monotonic_ns()}.txt"
    argv = [
        "py-spy",
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(SAMPLE_HZ),
        "--nonblocking",
        "--gil",
        "--full-filenames",
    ]
    spy = subprocess.Popen(
        [*argv, "--format", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(1.0)  # py-spy attaches before the first job
    try:
        seconds = run_jobs(client, uris)
    finally:
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
    assert raw.exists(), f"py-spy wrote nothing: {err.decode()[-500:]}"
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[stage_of(stack)] += int(n)
    return counts, seconds


def start(model_dir: Path, work: Path, env: dict[str, str], concurrency: int, config: str) -> tuple[Service, Client]:
    queue = "bench-overhead"
    faults = f'{{"noop_engine": "{FIXED_TEXT}"}}'
    flags, config_env = CONFIGS[config]
    argv = ("--device", "cpu", "--queue", queue, "--concurrency", str(concurrency), *flags)
    env = {**env, **config_env, "VLMQ_FAULTS": faults}
    worker = start_worker(model_dir, work, *argv, env=env, name=f"worker-{config}")
    settings = ClientSettings(
        broker_url=env["VLMQ_BROKER_URL"],
        s3_endpoint_url=env["VLMQ_S3_ENDPOINT_URL"],
        results_bucket=env["VLMQ_RESULTS_BUCKET"],
        queue=queue,
    )
    return worker, Client(settings)


def run(args: argparse.Namespace, work: Path) -> dict[str, Pass]:
    """Every workload under every configuration, one worker per configuration, on one SeaweedFS and Redis."""
    model_dir = write_processor(work / "processor", args.processor)
    media = make_media(args.jobs + args.warm_up)
    out = {}
    with local_stack(work) as stack:
        uris = {
            kind: [stack.upload(f"{kind}/{i:05d}.{kind}", body) for i, body in enumerate(bodies)]
            for kind, bodies in media.items()
        }
        for config in args.configs:
            worker, client = start(model_dir, work, stack.env, args.concurrency, config)
            try:
                procs = processes(worker)
                for kind in uris:  # every task thread copies the processor on its first job
                    run_jobs(client, uris[kind][: args.warm_up])
                for kind, kind_uris in uris.items():
                    out[f"{config}: {kind}"] = m = measure(client, procs, kind_uris[args.warm_up :])
                    print(f"{config}: {kind}: {m.jobs_per_s:.1f} jobs/s, CPU ms/job {m.cpu_ms}", flush=True)
                    if shutil.which("py-spy") and not args.no_sample:
                        m.samples, m.sampled_s = sample(client, worker.proc.pid, kind_uris[args.warm_up :], work)
                        print(f"{kind} samples: {dict(m.samples)}", flush=True)
            finally:
                worker.stop()
    return out


def tables(passes: dict[str, Pass]) -> str:
    """Jobs/s and CPU per process, then the engine process's GIL time split by stage (when sampled)."""
    kinds = list(passes)
    names = list(next(iter(passes.values())).cpu_ms)
    head = f"| | {' | '.join(kinds)} |\n|---|{'---:|' * len(kinds)}\n"
    rows = [f"| jobs/s (one worker, no-op engine) | {' | '.join(f'{p.jobs_per_s:.1f}' for p in passes.values())} |"]
    for name in names:
        cells = " | ".join(f"{p.cpu_ms[name]:.1f}" for p in passes.values())
        rows.append(f"| CPU ms/job: {name} | {cells} |")
    totals = " | ".join(f"**{p.worker_ms:.1f}**" for p in passes.values())
    rows.append(f"| **CPU ms/job: worker, all its processes** | {totals} |")
    rows.append(
        "| worker cores busy (CPU s / wall s) | "
        + " | ".join(f"{p.worker_ms * p.jobs_per_s / 1000:.2f}" for p in passes.values())
        + " |"
    )
    text = head + "\n".join(rows)
    if not all(p.samples for p in passes.values()):
        return text + "\n\n(no stage split: --no-sample, or py-spy is not installed)"
    stages = list(dict.fromkeys([s for s, _ in STAGES] + [OTHER]))
    split = [
        f"| engine process, GIL held by stage, ms/job (share) | {' | '.join(kinds)} |",
        f"|---|{'---:|' * len(kinds)}",
    ]
    for stage in stages:
        shares = " | ".join(f"{p.gil_ms(stage):.1f} ({p.gil_ms(stage) / p.gil_ms():.0%})" for p in passes.values())
        split.append(f"| {stage} | {shares} |")
    totals = {
        "**GIL held, all stages**": [f"**{p.gil_ms():.1f}**" for p in passes.values()],
        "engine process CPU outside the GIL (measured CPU - GIL held)": [
            f"{p.cpu_ms[ENGINE] - p.gil_ms():.1f}" for p in passes.values()
        ],
        "GIL held, share of the sampled pass's wall time": [
            f"{p.gil_ms() * p.jobs / 1000 / p.sampled_s:.0%}" for p in passes.values()
        ],
    }
    split += [f"| {name} | {' | '.join(cells)} |" for name, cells in totals.items()]
    return text + "\n\n" + "\n".join(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400, help="measured jobs per workload")
    parser.add_argument("--warm-up", type=int, default=64, help="jobs per workload before measuring")
    parser.add_argument("--concurrency", type=int, default=32, help="the worker's --concurrency (task threads)")
    parser.add_argument("--processor", choices=["0.5b", "tiny"], default="0.5b")
    parser.add_argument(
        "--configs",
        type=lambda text: [c.strip() for c in text.split(";")],
        default=["in-process", "default"],
        help=f"worker configurations to compare, separated by ';' (from: {'; '.join(CONFIGS)})",
    )
    parser.add_argument("--no-sample", action="store_true", help="skip the py-spy pass")
    parser.add_argument("--keep-raw", type=Path, help="keep py-spy's raw stacks (collapsed format) in this folder")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--label", default="", help="a word for the section's title, e.g. before or after")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()

    global KEEP_RAW
    KEEP_RAW = args.keep_raw
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vlmq-bench-overhead-") as tmp:
        passes = run(args, Path(tmp))
    result = tables(passes)
    print(result)
    load = " ".join(f"{x:.2f}" for x in load_before) + " at the start, " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    if not args.no_write:
        append_section(args.out, section(args, result, load))


def section(args: argparse.Namespace, result: str, load: str) -> str:
    label = f": {args.label}" if args.label else ""
    command = f"python bench/overhead.py{f' --label {args.label}' if args.label else ''} --jobs {args.jobs} "
    command += f"--warm-up {args.warm_up} --concurrency {args.concurrency} --processor {args.processor}"
    command += f" --configs '{'; '.join(args.configs)}'"
    faults = f'{{"noop_engine": "{FIXED_TEXT}"}}'
    return (
        f"\n## Per-job overhead of one worker, no-op engine{label} ({date.today():%Y-%m-%d})\n\n"
        f"- machine: {machine()}; load average {load} at the end\n"
        f"- command: `{command}`\n"
        f"- worker: `vlmq worker --device cpu --concurrency {args.concurrency}` with `VLMQ_FAULTS='{faults}'`, "
        f"configurations (flags, environment): "
        + "; ".join(f"{c}: `{' '.join(CONFIGS[c][0])}` {CONFIGS[c][1]}" for c in args.configs)
        + ", "
        f"the {args.processor} processor, torch threads 1; {args.jobs} jobs per workload after {args.warm_up} "
        f"warm-up jobs each; py-spy {'on' if not args.no_sample else 'off'}\n\n{result}\n"
    )


if __name__ == "__main__":
    main()
