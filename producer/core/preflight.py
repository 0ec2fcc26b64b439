"""Start-up checks of `vlmq worker` and `vlmq api`: what they need outside themselves answers, or one line says what
to do (`CannotStart`; the command prints it and exits with status 2, which the `--gpus` supervisor does not retry).

- the broker answers a PING within `VLMQ_BROKER_CONNECT_TIMEOUT_S`, with the credentials in `VLMQ_BROKER_URL`
  (the worker only: the API starts without Redis and is not ready until it answers);
- the results bucket (workers, the API) and the staging bucket (the API) exist. Other S3 answers (access denied
  to HeadBucket, an endpoint down for a moment) are logged and not fatal: reads and writes retry on their own.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from botocore.exceptions import BotoCoreError, ClientError
from kombu.utils.url import maybe_sanitize_url

from producer.core.errors import CannotStart

log = logging.getLogger(__name__)
_NO_BUCKET = ("404", "NoSuchBucket", "NotFound")


def check_broker(url: str, timeout_s: float) -> None:
    """Wait up to `timeout_s` for the broker to answer a PING.

    Raises:
        CannotStart: it did not answer in time, refused the credentials, or the URL is not a Redis URL.
    """
    shown = maybe_sanitize_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=min(5.0, timeout_s), socket_timeout=5)
    except ValueError as exc:
        raise CannotStart(f"VLMQ_BROKER_URL {shown!r} is not a Redis URL ({exc}). Hint: redis://host:6379/0") from None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.RedisError as exc:
            reason = str(exc).rstrip(".")
            if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in reason:
                raise CannotStart(
                    f"the broker at {shown} (VLMQ_BROKER_URL) refused the credentials: {reason}. Hint: put the "
                    "password in the URL, redis://:PASSWORD@host:6379/0"
                ) from None
            if time.monotonic() >= deadline:
                raise CannotStart(
                    f"the broker at {shown} (VLMQ_BROKER_URL) did not answer within {timeout_s:g} s: {reason}. Hint: "
                    "start Redis or fix the URL; VLMQ_BROKER_CONNECT_TIMEOUT_S sets how long to wait"
                ) from None
        time.sleep(0.25)  # between connection attempts, until the deadline


def check_bucket(s3: Any, bucket: str, variable: str, endpoint: str | None) -> None:
    """Refuse to start when `bucket` does not exist.

    Raises:
        CannotStart: S3 says there is no such bucket.
    """
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NO_BUCKET:
            where = f" --endpoint-url {endpoint}" if endpoint else ""
            raise CannotStart(
                f"the bucket {bucket!r} ({variable}) does not exist{f' at {endpoint}' if endpoint else ''}. Hint: "
                f"create it (aws s3 mb s3://{bucket}{where}), or set {variable} to a bucket that exists"
            ) from None
        log.warning("could not check that the bucket %r (%s) exists: %s; going on", bucket, variable, code or exc)
    except BotoCoreError as exc:
        log.warning("could not check that the bucket %r (%s) exists: %s; going on", bucket, variable, exc)
