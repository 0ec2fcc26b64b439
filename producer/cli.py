"""`vlmq`: the command line. Thin: parses arguments and calls the client or the worker.

Producer commands (submit, result) need no torch; worker commands (worker, demo, make-tiny-model) import the
worker package only when they run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from producer.cli_batch import EXIT_FAILED, EXIT_NO_RESULT, add_batch_parser, print_json
from producer.core.errors import Location, one_line
from producer.core.settings import invalid_settings, settings_models, unreadable_setting


def submit_flag(location: Location) -> str:
    """The `vlmq submit` flag (or argument) behind a Job field: `generation.max_new_tokens` -> `--max-new-tokens`."""
    field = [part for part in location if isinstance(part, str)][-1]
    return {"media": "URI", "uri": "URI", "ttl_s": "--ttl"}.get(field, "--" + field.replace("_", "-"))


def cmd_submit(args: argparse.Namespace) -> int:
    from producer.client import Client, Priority
    from producer.core.jobs import Job

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
        print(f"vlmq submit: invalid job: {one_line(exc, submit_flag)}", file=sys.stderr)
        return EXIT_NO_RESULT
    client = Client.from_env()
    priority: Priority = "bulk" if args.bulk else "interactive"
    if not args.wait:
        for job in jobs:
            print(client.submit(job, priority=priority).id)
        return 0
    results = client.run(jobs, progress=not args.quiet, timeout=args.timeout, priority=priority)
    for result in results:
        print_json(result.model_dump(mode="json"))
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
    print_json(result.model_dump(mode="json"))
    return 0 if result.ok else EXIT_FAILED


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from producer.client import Client

    letters = Client.from_env().dead_letters()
    for letter in letters:
        if args.json:
            print_json({"job": letter.job, "result": letter.result.model_dump(mode="json")})
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

    from producer.core.broker import QueueCollector
    from producer.core.keys import Keys
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
        hint = "Hint: pip install -e '.[api]' in vlmq's checkout"
        print(f"vlmq api: {exc.name} is not installed. {hint}", file=sys.stderr)
        return EXIT_NO_RESULT
    return main(args.host, args.port, args.allow_no_auth_local)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from worker.devtools.tiny import make_tiny_model

    path = make_tiny_model(args.dir, seed=args.seed, preset=args.preset)
    print(f"wrote a random-weight LLaVA-OneVision checkpoint ({args.preset}) to {path} (its text is meaningless)")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  (`vlmq api` runs in a child process: say what is missing before starting)

        from worker.devtools.up import run_up
    except ImportError as exc:
        print(f"vlmq up: {exc.name} is not installed. Hint: pip install -e '.[up]' in vlmq's checkout", file=sys.stderr)
        return EXIT_NO_RESULT
    if args.workers < 1:
        print("vlmq up: --workers must be at least 1", file=sys.stderr)
        return EXIT_NO_RESULT
    return run_up(args.port, args.data_dir, args.model, args.engine, args.workers, args.host)


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.devtools.demo import run_demo

    return run_demo(jobs=args.jobs, model=args.model, max_batch_size=args.max_batch_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmq",
        description="Caption and question images and videos with LLaVA-OneVision on queue-fed GPU workers. "
        "Configuration: VLMQ_* environment variables (docs/configuration.md).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from worker.cli import add_worker_command  # argparse only: the worker's runtime loads when the command runs

    add_worker_command(sub)
    _add_service_commands(sub)
    _add_job_commands(sub)
    add_batch_parser(sub)
    _add_local_commands(sub)
    return parser


def _add_service_commands(sub: Any) -> None:
    """The long-running services beside the worker, and their probes."""
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


def _add_job_commands(sub: Any) -> None:
    """Sending jobs and reading their ends."""
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


def _add_local_commands(sub: Any) -> None:
    """Everything on this machine: a test checkpoint, the whole stack, the demo."""
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

    p = sub.add_parser("up", help="everything on this machine, in the foreground: Redis, S3, workers and the API")
    p.add_argument("--port", type=int, default=8000, help="the API's port; Redis uses PORT+1, S3 PORT+2 (default 8000)")
    p.add_argument("--data-dir", type=Path, help="data and logs (default $XDG_DATA_HOME/vlmq or ~/.local/share/vlmq)")
    p.add_argument("--model", help="model id or checkpoint (default VLMQ_MODEL or the 0.5B model, else a tiny one)")
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto", help="the workers' engine")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address the API binds (default 127.0.0.1)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="everything local, end to end: Redis, S3, a worker, sample images")
    p.add_argument("--jobs", type=int, default=12, help="how many jobs to run (default 12)")
    p.add_argument("--model", help="model to try first (default VLMQ_MODEL or the real 0.5B model)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # "Found credentials in environment variables." on every command otherwise
        logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ValidationError as exc:  # a VLMQ_ variable out of range: the user's environment, not a bug
        if exc.title not in {model.__name__ for model in settings_models()}:
            raise
        print(f"vlmq {args.command}: {invalid_settings(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # a VLMQ_ variable that is not the JSON its list or dict setting needs
        print(f"vlmq {args.command}: {unreadable_setting(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
