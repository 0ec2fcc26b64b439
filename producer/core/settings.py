"""Settings shared by producers and workers: where the broker, the result backend and the results bucket are.

Every field is an environment variable with the prefix `VLMQ_` (`VLMQ_BROKER_URL`, ...). AWS credentials come from
boto3's standard chain (environment, shared files, instance roles), never from here.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from producer.core.errors import Location, one_line


class SharedSettings(BaseSettings):
    """What producers and workers must agree on: broker, result backend, queues, Redis namespace, results bucket.

    `ClientSettings` (producers) and `worker.settings.WorkerSettings` both derive from it.
    """

    model_config = SettingsConfigDict(env_prefix="VLMQ_", extra="ignore")

    broker_url: str = Field("redis://localhost:6379/0", description="Celery broker (redis:// or rediss://)")
    result_backend: str | None = Field(None, description="Celery result backend; defaults to the broker URL")
    queue: str = Field("vlmq", description="bulk queue: batches and client.run() send here; workers serve it second")
    interactive_queue: str = Field(
        "", description="queue of single jobs (client.submit), taken from first; default `<queue>-interactive`"
    )
    redis_namespace: str = Field(
        "vlmq",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="prefix of every Redis key vlmq writes (<namespace>:...; see producer/core/keys.py): deployments "
        "sharing one Redis need different namespaces (and queues); changing it leaves the old keys' state behind",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; unset means AWS S3")
    s3_region: str | None = Field(None, description="S3 region; unset means boto3's default chain")
    results_bucket: str | None = Field(None, description="bucket that workers write JobResult JSON to")
    results_prefix: str = Field("results/", description="key prefix of result objects: <prefix><job id>.json")
    broker_connect_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="how long `vlmq worker` waits at start-up for the broker to answer; past it, it exits with "
        "status 2",
    )
    visibility_timeout_s: int = Field(
        900,
        ge=1,
        description="Redis redelivers a message unacknowledged this long (so a dead worker's jobs come back after it); "
        "keep it above the longest retry delay + batch run",
    )
    webhook_secret: str | None = Field(
        None, description="key of the HMAC-SHA256 signature of batch webhooks (X-Vlmq-Signature)", repr=False
    )
    result_expires_s: int = Field(7 * 24 * 3600, ge=60, description="how long Redis keeps a result")

    @model_validator(mode="after")
    def _interactive_queue_follows_queue(self) -> Self:
        # Deployments kept apart by VLMQ_QUEUE on one Redis must not share an interactive queue.
        if not self.interactive_queue:
            self.interactive_queue = f"{self.queue}-interactive"
        return self

    @field_validator("results_prefix")
    @classmethod
    def _prefix_shape(cls, prefix: str) -> str:
        if prefix.startswith("/"):
            raise ValueError("VLMQ_RESULTS_PREFIX must not start with '/'. Hint: use e.g. 'results/'")
        return prefix

    @property
    def queues(self) -> list[str]:
        """The queues workers consume, in the order they are served."""
        return [self.interactive_queue, self.queue]

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    def result_key(self, job_id: str) -> str:
        """The S3 key of a job's result object."""
        return f"{self.results_prefix}{job_id}.json"


def invalid_settings(exc: ValidationError, flags: Collection[str] = ()) -> str:
    """A settings ValidationError as one line: each wrong setting by where it came from (its flag when one of `flags`
    set it, else its environment variable), the value given (secrets hidden) and what it must be."""

    def name_of(location: Location) -> str:
        name = str(location[0])
        return "--" + name.replace("_", "-") if name in flags else f"VLMQ_{name.upper()}"

    secret = {name for model in settings_models() for name, field in model.model_fields.items() if not field.repr}
    return "invalid settings: " + one_line(exc, name_of, secret)


def unreadable_setting(exc: SettingsError) -> str:
    """pydantic-settings' error for a variable it could not parse (a list or dict setting is JSON), as one line."""
    field = re.search(r'field "(\w+)"', str(exc))
    name = f"VLMQ_{field.group(1).upper()}" if field else "a VLMQ_ variable"
    cause = f" ({exc.__cause__})" if exc.__cause__ else ""
    return f'invalid settings: {name} is not valid JSON{cause}; write a list as ["a", "b"]'


def settings_models() -> list[type[SharedSettings]]:
    """SharedSettings and every subclass imported so far (ClientSettings, WorkerSettings, ApiSettings, ...)."""
    models: list[type[SharedSettings]] = [SharedSettings]
    for model in models:
        models.extend(model.__subclasses__())
    return models
