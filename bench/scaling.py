"""Scale-out: jobs/s of 1 vs 2 (vs N) worker processes on one queue, side by side in one run.

Each process is a whole `vlmq worker` (tiny model, CPU, one torch thread: a worker is GIL-bound near one core,
see BENCHMARKS.md); the producer submits all jobs, then the clock runs until the last result is in.

    python bench/scaling.py [--jobs 400] [--processes 1,2] [--batch 8] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from producer import Client, ClientSettings, Job
from worker.devtools.local_services import start_worker

from common import ROOT, append_section, local_stack, machine, make_images


def run(env: dict[str, str], model_dir: Path, uris: list[str], args: argparse.Namespace, processes: int) -> float:
    queue = f"bench-scale-{processes}"
    client = Client(ClientSettings(queue=queue))
    worker_args = ["--device", "cpu", "--max-batch-size", str(args.batch), "--queue", queue]
    workers = [
        start_worker(model_dir, Path(args.work), *worker_args, env=env, name=f"scale-{processes}-{i}")
        for i in range(processes)
    ]

    def jobs(chosen: list[str]) -> list[Job]:
        return [Job(media=[u], max_new_tokens=args.max_new_tokens) for u in chosen]

    try:
        client.run(jobs(uris[: 2 * args.batch * processes]), progress=False, timeout=600)  # warm-up
        started = time.perf_counter()
        results = client.run(jobs(uris), progress=False, timeout=1200, poll_interval_s=0.02)
        elapsed = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.stop()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    return len(results) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts to compare")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    counts = [int(c) for c in args.processes.split(",")]

    from worker.devtools.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="vlmq-bench-") as tmp:
        args.work = tmp
        model_dir = make_tiny_model(Path(tmp) / "model")
        with local_stack(Path(tmp), VLMQ_TORCH_THREADS="1") as stack:
            uris = [stack.upload(f"i/{i:05d}.jpg", body) for i, body in enumerate(make_images(60))]
            uris = [uris[i % len(uris)] for i in range(args.jobs)]
            rates = {}
            for processes in counts:
                rates[processes] = run(stack.env, model_dir, uris, args, processes)
                print(processes, f"{rates[processes]:.1f} jobs/s", flush=True)

    base = rates[counts[0]]
    lines = ["| worker processes | jobs/s | vs 1 process |", "|---:|---:|---:|"]
    lines += [f"| {n} | {r:.1f} | {r / base:.2f}x |" for n, r in rates.items()]
    table = "\n".join(lines)
    print(table)
    command = (
        f"python bench/scaling.py --jobs {args.jobs} --processes {args.processes} --batch {args.batch} "
        f"--max-new-tokens {args.max_new_tokens}"
    )
    append_section(
        args.out,
        f"\n## Scale-out: worker processes on one queue ({datetime.now(UTC):%Y-%m-%d})\n\n"
        f"- machine: {machine()}, no GPU (CPU fp32)\n- command: `{command}`\n"
        f"- {args.jobs} caption jobs on the throughput benchmark's JPEGs, {args.max_new_tokens} new tokens, "
        f"tiny model, max batch {args.batch}, one torch thread per worker; "
        "Redis, SeaweedFS and the producer on the same machine\n\n"
        f"{table}\n",
    )


if __name__ == "__main__":
    main()
