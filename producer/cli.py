"""`vlmq`: the command line. Thin: parses arguments and calls the client or the worker.

Producer commands (submit, result) need no torch; worker commands (worker, demo, make-tiny-model) import the
worker package only when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from producer.worker_flags import add_worker_arguments, child_flags, worker_overrides

EXIT_FAILED = 1
EXIT_NO_RESULT = 2


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def cmd_submit(args: argparse.Namespace) -> int:
    from producer.client import Client, Priority
    from producer.jobs import Job

    common: dict[str, Any] = {"task": args.task, "max_new_tokens": args.max_new_tokens}
    if args.question:
        common["question"] = args.question
    if args.prompt:
        common["prompt"] = args.prompt
    if args.ttl:
        common["ttl_s"] = args.ttl
    try:
        if args.together:
            jobs = [Job(media=list(args.uris), **common)]
        else:
            jobs = [Job(media=[uri], **common) for uri in args.uris]
    except ValidationError as exc:
        print(f"vlmq submit: invalid job:\n{exc}", file=sys.stderr)
        return EXIT_NO_RESULT
    client = Client.from_env()
    priority: Priority = "bulk" if args.bulk else "interactive"
    if not args.wait:
        for job in jobs:
            print(client.submit(job, priority=priority).id)
        return 0
    results = client.run(jobs, progress=not args.quiet, timeout=args.timeout, priority=priority)
    for result in results:
        _print_json(result.model_dump(mode="json"))
    return 0 if all(r.ok for r in results) else EXIT_FAILED


def cmd_result(args: argparse.Namespace) -> int:
    from producer.client import Client

    client = Client.from_env()
    try:
        result = client.result(args.job_id, timeout=args.wait) if args.wait else client.peek(args.job_id)
    except TimeoutError as exc:
        print(f"vlmq result: {exc}", file=sys.stderr)
        return EXIT_NO_RESULT
    if result is None:
        print(
            f"vlmq result: no result for {args.job_id} yet: it is queued, running, or unknown. "
            "Use --wait SECONDS to wait for it.",
            file=sys.stderr,
        )
        return EXIT_NO_RESULT
    _print_json(result.model_dump(mode="json"))
    return 0 if result.ok else EXIT_FAILED


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from producer.client import Client

    letters = Client.from_env().dead_letters()
    for letter in letters:
        if args.json:
            _print_json({"job": letter.job, "result": letter.result.model_dump(mode="json")})
        else:
            error = letter.result.error
            code, message = (error.code, error.message) if error else ("", "")
            print(f"{letter.result.id}\t{letter.result.finished_at:%Y-%m-%dT%H:%M:%SZ}\t{code}\t{message}")
    if not args.json:
        print(f"{len(letters)} dead-lettered jobs", file=sys.stderr)
    return 0


def cmd_retry_failed(args: argparse.Namespace) -> int:
    from producer.client import Client

    sent = Client.from_env().retry_failed(args.job_ids or None)
    for job_id in sent:
        print(job_id)
    missing = set(args.job_ids) - set(sent)
    print(f"re-enqueued {len(sent)} dead-lettered jobs under their own ids", file=sys.stderr)
    if missing:
        print(f"vlmq retry-failed: not dead-lettered: {', '.join(sorted(missing))}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.app import run_worker
    from worker.devtools.faults import hooks_for
    from worker.errors import ConfigError
    from worker.settings import WorkerSettings

    overrides = worker_overrides(args)
    try:
        settings = WorkerSettings(**overrides)
    except ValidationError as exc:
        print(f"vlmq worker: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_NO_RESULT
    if args.gpus:
        from worker.supervisor import Supervisor, parse_gpus

        try:
            gpus = parse_gpus(args.gpus)
        except ValueError as exc:
            print(f"vlmq worker: {exc}", file=sys.stderr)
            return EXIT_NO_RESULT
        return Supervisor(gpus, child_flags(overrides), metrics_port=settings.metrics_port).run()
    try:
        run_worker(settings, hooks_for(settings.faults))
    except ConfigError as exc:  # the settings cannot work here: the message says how to fix them; no traceback
        print(f"vlmq worker: cannot start: {exc}", file=sys.stderr)
        return EXIT_NO_RESULT
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    path = "/readyz" if args.ready else "/livez"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{args.port}{path}", timeout=args.timeout) as response:
            print(response.read().decode().strip())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"{path}: {exc.read().decode().strip()}", file=sys.stderr)
    except OSError as exc:
        print(f"{path}: no worker answers on port {args.port} ({exc})", file=sys.stderr)
    return 1


def cmd_exporter(args: argparse.Namespace) -> int:
    import redis
    from prometheus_client import CollectorRegistry, start_http_server

    from producer.broker import QueueCollector
    from producer.keys import Keys
    from producer.settings import ClientSettings

    settings = ClientSettings()
    queues = args.queues.split(",") if args.queues else settings.queues
    registry = CollectorRegistry()
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=10)
    registry.register(QueueCollector(client, queues, Keys.of(settings)))
    start_http_server(args.port, registry=registry)
    logging.getLogger(__name__).info("queue metrics of %s on :%d/metrics", ", ".join(queues), args.port)
    threading.Event().wait()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    try:
        from producer.api.server import main
    except ImportError as exc:
        print(f"vlmq api: {exc.name} is not installed. Hint: pip install 'vlmq[api]'", file=sys.stderr)
        return EXIT_NO_RESULT
    return main(args.host, args.port, args.allow_no_auth_local)


def _manifest_options(args: argparse.Namespace, client: Any) -> tuple[str, dict[str, Any]]:
    source = args.manifest or args.prefix
    if not source:
        raise SystemExit("vlmq batch: give an s3://bucket/prefix/ or --manifest FILE.jsonl|.csv")
    defaults: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    for field in ("task", "question", "prompt"):
        if getattr(args, field):
            defaults[field] = getattr(args, field)
    options: dict[str, Any] = {"defaults": defaults, "glob": args.glob}
    if source.startswith("s3://"):
        options["s3"] = client.s3
    return source, options


def cmd_batch(args: argparse.Namespace) -> int:
    from producer.client import Client
    from producer.manifest import InvalidManifest, read_manifest, validate_manifest

    client = Client.from_env()
    if args.batch_command in ("submit", "validate"):
        source, options = _manifest_options(args, client)
        try:
            count = validate_manifest(source, batch=getattr(args, "name", None), **options)
        except (InvalidManifest, ValueError, OSError) as exc:
            print(f"vlmq batch {args.batch_command}: {exc}", file=sys.stderr)
            return EXIT_NO_RESULT
        if args.batch_command == "validate":
            print(f"{source}: {count} valid jobs")
            return 0
        jobs = (item for _, item in read_manifest(source, batch=args.name, **options) if not isinstance(item, str))
        client.submit_batch(args.name, jobs, webhook=args.webhook, progress=not args.quiet)
        status = client.batch(args.name).status()
        print(
            f"batch {args.name}: {status.total} jobs, {status.succeeded} already succeeded; "
            f"follow it with `vlmq batch status {args.name} --watch`",
            file=sys.stderr,
        )
        return 0
    batch = client.batch(args.name)
    if batch.status().status == "unknown":
        print(f"vlmq batch: no batch named {args.name!r} (check VLMQ_BROKER_URL)", file=sys.stderr)
        return EXIT_NO_RESULT
    if args.batch_command == "status":
        return _batch_status(batch, args.watch, args.json)
    if args.batch_command == "results":
        output = Path(args.output)
        errors_path = args.errors or str(output.with_suffix("")) + ".errors" + (output.suffix or ".jsonl")
        try:
            ok, failed, missing = batch.write_results(args.output, errors_path)
        except RuntimeError as exc:
            print(f"vlmq batch results: {exc}", file=sys.stderr)
            return EXIT_NO_RESULT
        print(f"{ok} results to {args.output}, {failed} failures to {errors_path}", file=sys.stderr)
        if missing:
            print(f"{missing} jobs have no result yet: the batch is {batch.status().status}", file=sys.stderr)
            return EXIT_NO_RESULT
        return 0
    if args.batch_command == "retry-failed":
        print(f"re-enqueued {len(batch.retry_failed())} failed jobs of {args.name}", file=sys.stderr)
        return 0
    batch.cancel()
    print(f"batch {args.name} cancelled: jobs not started yet end `cancelled`", file=sys.stderr)
    return 0


def _batch_status(batch: Any, watch: bool, as_json: bool) -> int:
    if watch:
        status = batch.watch()
        print(f"{status.name}: {status.status}", file=sys.stderr)
        return 0 if status.status == "completed" else EXIT_FAILED
    status = batch.status()
    if as_json:
        _print_json(status.to_json())
    else:
        print(
            f"{status.name}: {status.status}; {status.total} jobs: {status.queued} queued, {status.running} "
            f"running, {status.succeeded} succeeded, {status.failed} failed, {status.cancelled} cancelled"
        )
    return 0 if status.status in ("completed", "running", "submitting") else EXIT_FAILED


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from worker.devtools.tiny import make_tiny_model

    path = make_tiny_model(args.dir, seed=args.seed, preset=args.preset)
    print(f"wrote a random-weight LLaVA-OneVision checkpoint ({args.preset}) to {path} (its text is meaningless)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.devtools.demo import run_demo

    return run_demo(jobs=args.jobs, model=args.model, max_batch_size=args.max_batch_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmq",
        description="Caption and question images and videos with LLaVA-OneVision on queue-fed GPU workers. "
        "Configuration: VLMQ_* environment variables (see the README).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run a GPU worker: load the model, consume jobs in micro-batches")
    add_worker_arguments(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("health", help="exit 0 if the worker on this machine is alive (or --ready), else 1")
    p.add_argument("--port", type=int, default=9808, help="the worker's VLMQ_METRICS_PORT (default 9808)")
    p.add_argument("--ready", action="store_true", help="check readiness (model loaded, consuming) instead")
    p.add_argument("--timeout", type=float, default=15.0)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("exporter", help="serve queue backlog metrics for Prometheus / autoscaling")
    p.add_argument("--port", type=int, default=9809)
    p.add_argument("--queues", help="comma-separated queue names (default VLMQ_INTERACTIVE_QUEUE,VLMQ_QUEUE)")
    p.set_defaults(func=cmd_exporter)

    p = sub.add_parser("api", help="serve the HTTP API: native job and batch routes, OpenAI-compatible /v1 routes")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--allow-no-auth-local", action="store_true", help="no VLMQ_API_KEYS: serve on 127.0.0.1 only")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("submit", help="enqueue jobs, one per URI; print their ids (or results with --wait)")
    p.add_argument("uris", nargs="+", metavar="URI", help="s3://bucket/key, file:///path, ...")
    p.add_argument("--task", choices=["caption", "qa"], default="caption")
    p.add_argument("--question", help="the question (task qa)")
    p.add_argument("--prompt", help="caption prompt instead of the default")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--ttl", type=float, metavar="SECONDS", help="fail a job `expired` if not started this soon")
    p.add_argument("--bulk", action="store_true", help="send to the bulk queue (default: the interactive queue)")
    p.add_argument("--together", action="store_true", help="one job with all URIs in one prompt (multi-image)")
    p.add_argument("--wait", action="store_true", help="wait and print each result as a JSON line")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("result", help="print a job's result as JSON (exit 1 if it failed, 2 if none yet)")
    p.add_argument("job_id")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait up to SECONDS for it")
    p.set_defaults(func=cmd_result)

    p = sub.add_parser("dead-letters", help="list jobs that exhausted their retries or kept crashing workers")
    p.add_argument("--json", action="store_true", help="one JSON line per job: the job and its failed result")
    p.set_defaults(func=cmd_dead_letters)

    p = sub.add_parser("retry-failed", help="re-enqueue dead-lettered jobs (all, or the ids given) under their ids")
    p.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    p.set_defaults(func=cmd_retry_failed)

    p = sub.add_parser("batch", help="named bulk runs: submit, validate, status, results, retry-failed, cancel")
    batch = p.add_subparsers(dest="batch_command", required=True, metavar="BATCH_COMMAND")
    for name, help_text in (
        ("submit", "enqueue a manifest or S3 prefix as a named batch"),
        ("validate", "check every line of a manifest; enqueue nothing"),
    ):
        q = batch.add_parser(name, help=help_text)
        if name == "submit":
            q.add_argument("--name", required=True, help="batch name (submitting it again resumes it)")
            q.add_argument("--webhook", help="URL that gets a signed POST when the batch ends")
            q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        q.add_argument("prefix", nargs="?", metavar="s3://BUCKET/PREFIX/", help="every image and video under it")
        q.add_argument("--manifest", help="jobs.jsonl (one job per line, custom_id = id) or jobs.csv (uri, ...)")
        q.add_argument("--glob", help="with a prefix: only keys matching this glob, e.g. '*.jpg'")
        q.add_argument("--task", choices=["caption", "qa"], help="default task of lines that set none")
        q.add_argument("--question")
        q.add_argument("--prompt")
        q.add_argument("--max-new-tokens", type=int, default=128)
        q.set_defaults(func=cmd_batch)
    q = batch.add_parser("status", help="counts per state (exit 1 if failed or cancelled)")
    q.add_argument("name")
    q.add_argument("--watch", action="store_true", help="live progress bar with rate and ETA until it ends")
    q.add_argument("--json", action="store_true")
    q = batch.add_parser("results", help="write one JobResult JSON line per job, in input order")
    q.add_argument("name")
    q.add_argument("-o", "--output", required=True, help="succeeded jobs: .jsonl, or .parquet (needs pyarrow)")
    q.add_argument("--errors", help="JSONL of failed jobs (default OUTPUT without .jsonl + .errors.jsonl)")
    q = batch.add_parser("retry-failed", help="re-run the batch's failed jobs under their ids")
    q.add_argument("name")
    q = batch.add_parser("cancel", help="jobs not started yet end `cancelled`")
    q.add_argument("name")
    for q in batch.choices.values():
        q.set_defaults(func=cmd_batch)

    p = sub.add_parser("make-tiny-model", help="write a random-weight LLaVA-OneVision checkpoint for tests/demos")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--preset",
        choices=["tiny", "0.5b"],
        default="tiny",
        help="tiny: ~1 MB, tests and demos (default); 0.5b: the real 0.5B model's shapes, ~1.8 GB, GPU benchmarks",
    )
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("demo", help="everything local, end to end: Redis, S3, a worker, sample images")
    p.add_argument("--jobs", type=int, default=12, help="how many jobs to run (default 12)")
    p.add_argument("--model", help="model to try first (default VLMQ_MODEL or the real 0.5B model)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
