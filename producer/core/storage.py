"""The S3 client shared by producers and workers (result objects are read and written in `producer/core/results.py`)."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from producer.core.settings import SharedSettings


def make_s3_client(settings: SharedSettings, max_connections: int = 10) -> Any:
    """An S3 client for `VLMQ_S3_ENDPOINT_URL` (or AWS); credentials come from boto3's standard chain.

    boto3 clients are thread-safe, so one client serves all of a process's threads.
    """
    config = Config(
        max_pool_connections=max_connections,
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config)
