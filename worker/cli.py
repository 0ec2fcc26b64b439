"""`vlmq worker`: its flags, each overriding the `VLMQ_` setting of the same name (worker/settings.py), and the
command itself. `vlmq`'s parser (producer/cli.py) adds it with `add_worker_command`; importing this module loads
nothing of the worker's runtime (the command imports it when it runs). Choices are checked again by the worker's
settings, which name the environment variable.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from worker.supervisor import EXIT_CANNOT_START

# Settings a flag may override, in the order `--help` lists them.
SETTINGS = (
    "model",
    "device",
    "engine",
    "dtype",
    "quantization",
    "attn_implementation",
    "max_batch_size",
    "cuda_graphs",
    "decoder",
    "kv_cache_tokens",
    "prefill_tokens",
    "max_wait_ms",
    "concurrency",
    "preprocess_workers",
    "queue",
    "metrics_port",
    "gpu_memory_utilization",
    "max_model_len",
    "max_num_seqs",
    "enforce_eager",
)


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """The `vlmq worker` flags; an unset flag (None) leaves the environment's setting as it is."""
    p.add_argument("--model", help="Hugging Face id or local path (VLMQ_MODEL)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (VLMQ_DEVICE; default auto)")
    p.add_argument(
        "--engine",
        choices=("auto", "hf", "vllm"),
        help="what runs the model (VLMQ_ENGINE; default auto: vllm when installed and CUDA is present, else hf)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float16", "bfloat16", "float32"),
        help="weights and activations (VLMQ_DTYPE; default auto: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--quantization",
        choices=("none", "4bit"),
        help="4bit: bitsandbytes NF4 weights, pip install -e '.[4bit]' (VLMQ_QUANTIZATION; default none)",
    )
    p.add_argument(
        "--attn-implementation",
        choices=("sdpa", "flash_attention_2", "eager"),
        help="hf engine attention (VLMQ_ATTN_IMPLEMENTATION; default sdpa); flash_attention_2 needs CUDA, flash-attn",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        help="most jobs per model call (VLMQ_MAX_BATCH_SIZE; default 8 on CPU; on CUDA, hf: as many as free memory "
        "holds for their prompt lengths, up to 256)",
    )
    p.add_argument("--max-wait-ms", type=float, help="longest wait for batch-mates (VLMQ_MAX_WAIT_MS; default 50)")
    p.add_argument("--concurrency", type=int, help="jobs in flight: fetching, decoding, batched (default 2 x batch)")
    p.add_argument(
        "--preprocess-workers",
        type=int,
        help="processes that fetch, decode and prepare media beside the engine's (VLMQ_PREPROCESS_WORKERS; 0: none, "
        "in-process; default the cores per worker minus one, at most 8)",
    )
    p.add_argument("--queue", help="bulk queue to consume (VLMQ_QUEUE; default vlmq), after VLMQ_INTERACTIVE_QUEUE")
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /livez, /readyz on this port (VLMQ_METRICS_PORT)")
    _add_engine_arguments(p)
    p.add_argument(
        "--gpus",
        metavar="LIST",
        help="one worker process per GPU under a supervisor that restarts them: 0,1,2,3 or all "
        "(metrics ports: --metrics-port + GPU position)",
    )


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """How the engines use the device: the hf engine's decode loop, and the memory and lengths of both."""
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="hf engine on CUDA: greedy jobs decode on a static cache, each step a CUDA graph built at start-up "
        "(VLMQ_CUDA_GRAPHS; default on); --no-cuda-graphs: transformers' generate()",
    )
    p.add_argument(
        "--decoder",
        choices=("auto", "static", "generate"),
        help="hf engine decode loop (VLMQ_DECODER; default auto: static on CUDA with CUDA graphs, else generate)",
    )
    p.add_argument(
        "--kv-cache-tokens",
        type=int,
        help="hf static decoding: KV cache size in tokens (VLMQ_KV_CACHE_TOKENS; default from free GPU memory)",
    )
    p.add_argument(
        "--prefill-tokens",
        type=int,
        help="hf static decoding: most prompt tokens per prefill call (VLMQ_PREFILL_TOKENS; default from free memory)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="share of GPU memory the engine may take; vllm: of all of it, hf: of what is free after loading "
        "(VLMQ_GPU_MEMORY_UTILIZATION; default 0.9)",
    )
    p.add_argument("--max-model-len", type=int, help="longest prompt plus answer in tokens (VLMQ_MAX_MODEL_LEN)")
    p.add_argument("--max-num-seqs", type=int, help="vllm engine: most requests running at once (VLMQ_MAX_NUM_SEQS)")
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        help="vllm engine: no CUDA graphs, less memory, slower decoding (VLMQ_ENFORCE_EAGER)",
    )


def worker_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags set (unset flags left out)."""
    values = {name: getattr(args, name) for name in SETTINGS}
    return {name: value for name, value in values.items() if value is not None}


def child_flags(overrides: dict[str, Any]) -> list[str]:
    """The flags each `--gpus` child gets: the same overrides, one GPU each (the supervisor sets metrics ports)."""
    flags = []
    for name, value in overrides.items():
        if name == "metrics_port":
            continue
        if name == "device" and str(value).startswith("cuda"):
            value = "cuda:0"  # each child sees only its own GPU
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        else:
            flags.append(f"{flag}={value}")
    return flags


def add_worker_command(sub: Any) -> None:
    """Add `vlmq worker` to `vlmq`'s subcommands (`sub`: argparse's subparsers action)."""
    p = sub.add_parser("worker", help="run a GPU worker: load the model, consume jobs in micro-batches")
    add_worker_arguments(p)
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a worker (or, with --gpus, one per GPU under a supervisor); 2 when it cannot start here."""
    from producer.core.errors import CannotStart
    from producer.core.settings import invalid_settings, unreadable_setting
    from worker.app import run_worker
    from worker.devtools.faults import hooks_for
    from worker.errors import ConfigError
    from worker.settings import WorkerSettings

    overrides = worker_overrides(args)
    try:
        settings = WorkerSettings(**overrides)
    except ValidationError as exc:
        print(f"vlmq worker: {invalid_settings(exc, flags=overrides)}", file=sys.stderr)
        return EXIT_CANNOT_START
    except SettingsError as exc:  # a VLMQ_ variable that is not the JSON its list setting needs
        print(f"vlmq worker: {unreadable_setting(exc)}", file=sys.stderr)
        return EXIT_CANNOT_START
    if args.gpus:
        from worker.supervisor import Supervisor, parse_gpus

        try:
            gpus = parse_gpus(args.gpus)
        except ValueError as exc:
            print(f"vlmq worker: {exc}", file=sys.stderr)
            return EXIT_CANNOT_START
        return Supervisor(gpus, child_flags(overrides), metrics_port=settings.metrics_port).run()
    try:
        run_worker(settings, hooks_for(settings.faults))
    except (ConfigError, CannotStart) as exc:  # it cannot work here: the message says what to do; no traceback
        print(f"vlmq worker: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    return 0
