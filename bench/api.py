"""`vlmq api`'s own cost, no worker: jobs accepted per second by one API process, and the latency it adds over
`Client.submit`.

1. Throughput: one `vlmq api` process (uvicorn, one event loop), 16 concurrent clients, each on its own keep-alive
   connection sending `POST /jobs` (a one-image caption job, a fresh id each) back to back for `--seconds`, after a
   warm-up; accepted (202) jobs per second. The load generator is a bare asyncio HTTP/1.1 client in this process,
   so it costs far less CPU than the server it measures.
2. Added latency: `--requests` sequential `Client.submit` calls from this process, then as many sequential
   `POST /jobs` over one connection; p50 and p99 of each, and their difference.

Redis and SeaweedFS are local (`bench/common.py`); no worker consumes, so the queue only grows.

`--baseline DIR` compares another version of vlmq side by side in one run: DIR is a checkout of it (e.g.
`git worktree add /tmp/vlmq-base <commit>`), whose `vlmq api` runs with DIR on PYTHONPATH, next to this tree's, on
the same Redis and SeaweedFS. Throughput is measured `--rounds` times for each, taking turns (baseline first),
and the median is compared; latency once each.

    python bench/api.py [--clients 16] [--seconds 10] [--requests 1000] [--baseline DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

from common import MEDIA_BUCKET, ROOT, append_section, local_stack, machine

KEY = "bench-key"


def job_body() -> bytes:
    return json.dumps({"id": uuid.uuid4().hex, "media": [f"s3://{MEDIA_BUCKET}/cat.jpg"], "max_new_tokens": 8}).encode()


async def client_loop(port: int, until: float, latencies: list[float] | None, count: list[int]) -> None:
    """POST /jobs back to back on one keep-alive connection until `until` (time.perf_counter)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST /jobs HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
    try:
        while (started := time.perf_counter()) < until:
            body = job_body()
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            header = await reader.readuntil(b"\r\n\r\n")
            status = int(header.split(b" ", 2)[1])
            lines = header.lower().split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length"))
            await reader.readexactly(length)
            if status != 202:
                raise RuntimeError(f"POST /jobs answered {status}")
            count[0] += 1
            if latencies is not None:
                latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def throughput(port: int, clients: int, seconds: float, warmup_s: float = 2.0) -> float:
    count = [0]
    await asyncio.gather(*(client_loop(port, time.perf_counter() + warmup_s, None, count) for _ in range(clients)))
    count = [0]
    started = time.perf_counter()
    await asyncio.gather(*(client_loop(port, started + seconds, None, count) for _ in range(clients)))
    return count[0] / (time.perf_counter() - started)


def sequential_http(port: int, requests: int) -> list[float]:
    latencies: list[float] = []
    count = [0]

    async def run() -> None:
        while count[0] < requests:
            await client_loop(port, time.perf_counter() + 0.5, latencies, count)

    asyncio.run(run())
    return latencies[:requests]


def sequential_client(requests: int) -> list[float]:
    from producer import Client, Job

    client = Client.from_env()
    client.submit(Job(media=[f"s3://{MEDIA_BUCKET}/cat.jpg"]))  # connections and the queue declaration
    latencies = []
    for _ in range(requests):
        job = Job(id=uuid.uuid4().hex, media=[f"s3://{MEDIA_BUCKET}/cat.jpg"], max_new_tokens=8)
        started = time.perf_counter()
        client.submit(job)
        latencies.append(time.perf_counter() - started)
    return latencies


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99, in milliseconds."""
    cuts = statistics.quantiles(values, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


def start_api(env: dict[str, str], work: Path, root: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    """`vlmq api` from the code under `root`; its log is `work/<name>.log`."""
    from worker.devtools.local_services import free_port, wait_until

    port = free_port()
    limits = {"VLMQ_RATE_LIMIT_PER_S": "1000000", "VLMQ_RATE_BURST": "1000000", "VLMQ_MAX_CONCURRENT_PER_KEY": "1000"}
    settings = {**os.environ, **env, **limits, "VLMQ_API_KEYS": KEY, "PYTHONPATH": str(root)}
    argv = [sys.executable, "-m", "producer.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    log = (work / f"{name}.log").open("wb")
    proc = subprocess.Popen(argv, env=settings, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status == 200, 60, "vlmq api", proc)
    return proc, port


def measure(
    versions: dict[str, Path], env: dict[str, str], work: Path, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, tuple[float, float]]]:
    """Jobs/s of each version, `args.rounds` times taking turns, and the p50/p99 of sequential `POST /jobs`."""
    procs = {label: start_api(env, work, root, f"api-{label}") for label, root in versions.items()}
    try:
        rates: dict[str, list[float]] = {label: [] for label in versions}
        for _ in range(args.rounds):
            for label, (_, port) in procs.items():
                rates[label].append(asyncio.run(throughput(port, args.clients, args.seconds)))
                print(f"{label}: {rates[label][-1]:,.0f} jobs/s with {args.clients} clients", flush=True)
        latency = {label: percentiles(sequential_http(port, args.requests)) for label, (_, port) in procs.items()}
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(30)
    return rates, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--baseline", type=Path, help="a checkout of another vlmq version, measured side by side")
    parser.add_argument("--rounds", type=int, default=1, help="throughput runs per version, taking turns")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--note", default="", help="a line about the conditions (other load on the machine, ...)")
    args = parser.parse_args()
    versions = {"baseline": args.baseline.resolve(), "this tree": ROOT} if args.baseline else {"this tree": ROOT}

    with tempfile.TemporaryDirectory(prefix="vlmq-bench-") as tmp, local_stack(Path(tmp)) as stack:
        rates, latency = measure(versions, stack.env, Path(tmp), args)
        direct = percentiles(sequential_client(args.requests))
    median = {label: statistics.median(r) for label, r in rates.items()}
    rows = [
        "| `vlmq api` | jobs/s (median) | runs | `POST /jobs` p50 ms | p99 ms | added to `Client.submit` p50/p99 ms |",
        "|---|---:|---|---:|---:|---:|",
        f"| `Client.submit` (in process) | | | {direct[0]:.2f} | {direct[1]:.2f} | |",
    ]
    for label in versions:
        (p50, p99), runs = latency[label], ", ".join(f"{r:,.0f}" for r in rates[label])
        added = f"{p50 - direct[0]:.2f} / {p99 - direct[1]:.2f}"
        rows.append(f"| {label} | {median[label]:,.0f} | {runs} | {p50:.2f} | {p99:.2f} | {added} |")
    table = "\n".join(rows)
    ratio = ""
    if args.baseline:
        ratio = f"This tree / baseline: **{median['this tree'] / median['baseline']:.2f}x** jobs/s.\n"
        versions_line = f"- baseline: `{args.baseline}` (git {_commit(args.baseline)}); this tree: {_commit(ROOT)}\n"
    else:
        versions_line = ""
    print(table + "\n" + ratio)
    command = f"python bench/api.py --clients {args.clients} --seconds {args.seconds:g} --requests {args.requests}"
    if args.baseline:
        command += f" --baseline {args.baseline} --rounds {args.rounds}"
    append_section(
        args.out,
        f"\n## HTTP API: submissions per second and added latency ({datetime.now(UTC):%Y-%m-%d})\n\n"
        f"- machine: {machine()}\n- command: `{command}`\n"
        + versions_line
        + (f"- conditions: {args.note}\n" if args.note else "")
        + f"- one `vlmq api` process at a time (uvicorn, one event loop), no worker; jobs are one-image caption jobs "
        f"with fresh ids; {args.clients} concurrent keep-alive clients, {args.seconds:g} s per run after a 2 s "
        f"warm-up; latency of {args.requests:,} sequential submissions; local redis-server and SeaweedFS\n\n"
        f"{table}\n\n{ratio}",
    )


def _commit(root: Path) -> str:
    found = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
