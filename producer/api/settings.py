"""`vlmq api`'s settings: environment variables with the prefix `VLMQ_`, like every other vlmq process.

The media allow-list fields (`VLMQ_ALLOW_HTTP_MEDIA`, `VLMQ_ALLOW_PLAIN_HTTP`, `VLMQ_HTTP_ALLOWED_NETWORKS`,
`VLMQ_ALLOWED_BUCKETS`, `VLMQ_MAX_MEDIA_BYTES`) have the workers' names, so one deployment's environment gives the
front door and the workers the same rules: a URL the workers would refuse is refused before it is enqueued.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from producer.core.settings import SharedSettings

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


class ApiSettings(SharedSettings):
    """What `vlmq api` needs on top of the producer's settings."""

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="bearer keys clients may send (JSON list, or comma-separated); empty refuses to start unless "
        "--allow-no-auth-local is given",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="a completion's `model` when its result names none (/v1/models lists what running workers serve)",
    )
    staging_bucket: str | None = Field(
        None, description="bucket of uploads, data: URL images and Batch API files; default VLMQ_RESULTS_BUCKET"
    )
    staging_prefix: str = Field("staging/", description="key prefix of everything the API stores in the bucket")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest JSON request body (413 past it)")
    max_media_bytes: int = Field(64 << 20, ge=1, description="largest media upload or data: URL image, in bytes")
    max_file_bytes: int = Field(200 << 20, ge=1, description="largest Batch API input file (POST /v1/files)")
    max_wait_s: float = Field(60.0, gt=0, le=3600, description="longest ?wait= a status request may long-poll")
    chat_timeout_s: float = Field(600.0, gt=0, description="how long /v1/chat/completions waits for its job")
    rate_limit_per_s: float = Field(
        200.0, gt=0, description="requests per second per key, all API processes together (token bucket)"
    )
    rate_burst: int = Field(400, ge=1, description="requests a key may send at once before the rate applies")
    max_concurrent_per_key: int = Field(
        64, ge=1, description="requests of one key in flight at once, all API processes together (429 past it)"
    )
    allowed_buckets: list[str] = Field(default_factory=list, description="S3 buckets media may come from; empty = any")
    allow_http_media: bool = Field(False, description="accept https:// media URLs (the workers' setting)")
    allow_plain_http: bool = Field(False, description="with VLMQ_ALLOW_HTTP_MEDIA, also http:// (the workers')")
    http_allowed_networks: list[str] = Field(
        default_factory=list, description="private networks (CIDR) https media may come from (the workers' setting)"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list):
            return [str(k).strip() for k in value if str(k).strip()]
        return value

    @property
    def chat_body_bytes(self) -> int:
        """The largest chat completion body: a JSON body and one full-size data: URL image (base64: 4 bytes per 3)."""
        return self.max_body_bytes + math.ceil(self.max_media_bytes * 4 / 3)

    @property
    def bucket(self) -> str | None:
        """The staging bucket: VLMQ_STAGING_BUCKET, else the results bucket."""
        return self.staging_bucket or self.results_bucket
