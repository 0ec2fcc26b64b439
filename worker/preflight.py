"""What `vlmq worker` checks before it loads anything: the model can be had, the broker answers, the results bucket
exists. Each failure is one `ConfigError` or `CannotStart` line (exit status 2), not a traceback from deep inside
transformers, kombu or boto3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from producer.core.preflight import check_broker, check_bucket
from worker.errors import ConfigError
from worker.settings import DEFAULT_MODEL, WorkerSettings

_MAX_REASON = 300


def looks_like_a_path(model: str) -> bool:
    """A local path rather than a Hugging Face id (`namespace/name`)."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def check_model(model: str) -> None:
    """The model is a checkpoint directory, or a Hugging Face id whose config the cache or the hub has.

    Raises:
        ConfigError: a path that does not exist or holds no checkpoint, or an id that cannot be had.
    """
    path = Path(model).expanduser()
    hint = "Hint: give a directory that save_pretrained or `vlmq make-tiny-model DIR` wrote, or a Hugging Face id"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {model} is a directory but not a checkpoint: it has no config.json. {hint}")
        return
    if path.exists():
        raise ConfigError(f"--model {model} is a file, not a checkpoint directory. {hint}")
    if looks_like_a_path(model):
        raise ConfigError(f"--model {model}: no such directory. {hint} such as {DEFAULT_MODEL}")
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(model, "config.json"), str):
        return
    try:  # one question to the hub (a download retries for half a minute when there is no network)
        huggingface_hub.model_info(model, timeout=10)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:_MAX_REASON]
        raise ConfigError(
            f"--model {model} is not a local directory, and neither the Hugging Face cache nor the hub has it "
            f"({type(exc).__name__}: {reason}). Hint: check the id and the network (HF_HUB_OFFLINE=1 uses the cache "
            "only), or give a local checkpoint directory"
        ) from None


def check_start(settings: WorkerSettings, s3: Any) -> None:
    """The broker answers and the results bucket exists (the model is checked before the clients are built)."""
    check_broker(settings.broker_url, settings.broker_connect_timeout_s)
    if settings.results_bucket:
        check_bucket(s3, settings.results_bucket, "VLMQ_RESULTS_BUCKET", settings.s3_endpoint_url)
