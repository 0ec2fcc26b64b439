"""Bulk runs, producer side: enqueue rate of a manifest and time to assemble its results file.

1. Writes a JSONL manifest of N jobs, then `Client.submit_batch` streams it into Redis (validation, ledger,
   Celery messages) 1,000 at a time; jobs/s and the producer's peak RSS are measured for N/10 and N jobs, to show
   the memory is flat in the number of jobs.
2. Stores a result for every job of the N-job batch as a worker does (Celery's Redis backend, the JobResult JSON),
   then times `BatchHandle.results` writing the N-line JSONL file. No model runs: this is the producer's side.

    python bench/enqueue.py [--jobs 100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from common import ROOT, append_section, local_stack, machine

CHILD = """
import json, resource, sys, time
from producer import Client
from producer.manifest import read_manifest
manifest, name = sys.argv[1], sys.argv[2]
client = Client.from_env()
jobs = (job for _, job in read_manifest(manifest, batch=name) if not isinstance(job, str))
started = time.perf_counter()
client.submit_batch(name, jobs, progress=False)
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_manifest(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"e{i:07d}", "media": [f"s3://catalog/img/{i:07d}.jpg"]}) + "\n")


def enqueue(manifest: Path, name: str) -> dict[str, float]:
    """Run the producer in its own process, so its peak RSS is the enqueue's alone."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(manifest), name], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    small = args.jobs // 10

    from producer import Client, JobResult

    with tempfile.TemporaryDirectory(prefix="vlmq-bench-") as tmp, local_stack(Path(tmp)) as stack:
        rows = {}
        for n in (small, args.jobs):
            manifest = Path(tmp) / f"jobs-{n}.jsonl"
            write_manifest(manifest, n)
            rows[n] = enqueue(manifest, f"bench-{n}")
            print(n, rows[n], flush=True)

        client = Client.from_env()
        backend = client.celery.backend
        name = f"bench-{args.jobs}"
        started = time.perf_counter()
        for ids in client.batches.ids(name, 1000):
            pipe = backend.client.pipeline(transaction=False)
            for job_id in ids:
                result = JobResult(id=job_id, status="succeeded", text="a photo of a shoe on a white background")
                meta = {"status": "SUCCESS", "result": result.model_dump(mode="json"), "task_id": job_id}
                pipe.set(backend.get_key_for_task(job_id), json.dumps(meta))
            pipe.execute()
        stored_s = time.perf_counter() - started
        started = time.perf_counter()
        with (Path(tmp) / "out.jsonl").open("w") as out:
            counts = client.batch(name).results(out)
        assemble_s = time.perf_counter() - started
        lines = sum(1 for _ in (Path(tmp) / "out.jsonl").open())
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert counts == (args.jobs, 0, 0) and lines == args.jobs, (counts, lines)
        del stack

    table = ["| jobs | enqueue s | jobs/s | producer peak RSS MB |", "|---:|---:|---:|---:|"]
    table += [
        f"| {n:,} | {r['seconds']:.1f} | {n / r['seconds']:,.0f} | {r['peak_rss_mb']:.0f} |" for n, r in rows.items()
    ]
    text = "\n".join(table)
    print(text)
    print(f"results file: {args.jobs:,} lines in {assemble_s:.1f} s ({args.jobs / assemble_s:,.0f} lines/s)")
    append_section(
        args.out,
        f"\n## Bulk runs: enqueue rate and results file ({datetime.now(UTC):%Y-%m-%d})\n\n"
        f"- machine: {machine()}\n- command: `python bench/enqueue.py --jobs {args.jobs}`\n"
        f"- `vlmq batch`'s path: a JSONL manifest read line by line, validated, sent 1,000 at a time "
        "(ledger entries pipelined, Celery messages over one connection) to a local redis-server\n\n"
        f"{text}\n\n"
        f"Peak RSS at {small:,} and {args.jobs:,} jobs shows whether memory grows with the manifest.\n"
        f"Results file: {args.jobs:,} results stored as a worker stores them ({stored_s:.1f} s, not part of the "
        f"figure), then `vlmq batch results` wrote the {args.jobs:,}-line JSONL in {assemble_s:.1f} s "
        f"({args.jobs / assemble_s:,.0f} lines/s; this process's peak RSS {rss_mb:.0f} MB).\n",
    )


if __name__ == "__main__":
    main()
