"""Write each job's `JobResult` to S3 as JSON at `<VLMQ_RESULTS_PREFIX><job id>.json` (Redis holds it too)."""

from __future__ import annotations

import re
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from producer.jobs import JOB_ID_PATTERN, JobResult
from producer.settings import ClientSettings
from worker.errors import ResultWriteFailed


class ResultStore:
    """The durable record of results. A PutObject replaces the whole object at once: readers never see half."""

    def __init__(self, s3_client: Any, settings: ClientSettings) -> None:
        self.s3 = s3_client
        self.settings = settings
        self.bucket = settings.results_bucket

    def write(self, result: JobResult) -> str | None:
        """Store `result`; returns its s3:// URI, or None when no results bucket is configured.

        A result whose id breaks the contract (a message sent around the client) stays in Redis only: its id
        must not choose an S3 key.
        """
        if not self.bucket or not re.fullmatch(JOB_ID_PATTERN, result.id):
            return None
        key = self.settings.result_key(result.id)
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=result.model_dump_json().encode(),
                ContentType="application/json",
            )
        except (ClientError, BotoCoreError) as exc:
            raise ResultWriteFailed(f"could not write s3://{self.bucket}/{key}: {exc}") from None
        return f"s3://{self.bucket}/{key}"
