"""`vlmq batch ...`: named bulk runs from the command line (submit, validate, status, results, retry-failed, cancel).

Part of the CLI (producer/cli.py): parses arguments and calls `producer.Client`'s batch methods.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Exit statuses of every vlmq command: 0 done, 1 a job or batch failed, 2 nothing to show yet or cannot start.
EXIT_FAILED = 1
EXIT_NO_RESULT = 2


def print_json(obj: Any) -> None:
    """One JSON line on stdout (the CLI's machine-readable output)."""
    print(json.dumps(obj, ensure_ascii=False))


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
        print_json(status.to_json())
    else:
        print(
            f"{status.name}: {status.status}; {status.total} jobs: {status.queued} queued, {status.running} "
            f"running, {status.succeeded} succeeded, {status.failed} failed, {status.cancelled} cancelled"
        )
    return 0 if status.status in ("completed", "running", "submitting") else EXIT_FAILED


def add_batch_parser(sub: Any) -> None:
    """The `batch` command and its subcommands, on the CLI's subparsers."""
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
