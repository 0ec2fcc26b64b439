"""S3 access shared by producers and workers: one client factory, and reading a result object back."""

from __future__ import annotations

import re
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from producer.jobs import JOB_ID_PATTERN, JobResult
from producer.settings import ClientSettings


def make_s3_client(settings: ClientSettings, max_connections: int = 10) -> Any:
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


def read_result(s3: Any, settings: ClientSettings, job_id: str) -> JobResult | None:
    """The job's result object from S3, or None if it has not been written (or no bucket is configured)."""
    if not settings.results_bucket or not re.fullmatch(JOB_ID_PATTERN, job_id):
        return None  # an id outside the contract never names an S3 key (workers keep such results in Redis only)
    try:
        body = s3.get_object(Bucket=settings.results_bucket, Key=settings.result_key(job_id))["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    return JobResult.model_validate_json(body)
