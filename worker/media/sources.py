"""Where media bytes come from: S3 objects, files on the worker (opt-in), and http(s) URLs through `HttpFetcher`.

Every refusal or failure is a coded `MediaError`; nothing here decodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from botocore.exceptions import BotoCoreError, ClientError

from producer.core.jobs import split_s3_uri
from worker.errors import MediaForbidden, MediaNotFound, MediaUnavailable
from worker.media.https import HttpFetcher
from worker.media.limits import check_media_bytes
from worker.settings import WorkerSettings

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_FORBIDDEN_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}


class MediaFetcher:
    """Reads media bytes from the sources this worker's settings allow."""

    def __init__(self, settings: WorkerSettings, s3_client: Any) -> None:
        self.settings = settings
        self.s3 = s3_client
        self.http = HttpFetcher(settings)

    def fetch(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            return self._fetch_s3(uri)
        if uri.startswith("file://"):
            return self._fetch_file(uri)
        if uri.startswith(("https://", "http://")):
            return self.http.fetch(uri)
        raise MediaForbidden(
            f"{uri.split(':', 1)[0]} media is not enabled on this worker; put the object in S3 and send s3://bucket/key"
        )

    def _fetch_s3(self, uri: str) -> bytes:
        bucket, key = split_s3_uri(uri)
        allowed = self.settings.allowed_buckets
        if allowed and bucket not in allowed:
            raise MediaForbidden(f"bucket {bucket!r} is not in this worker's VLMQ_ALLOWED_BUCKETS")
        limit = self.settings.max_media_bytes
        try:
            # The size comes with GetObject's headers, before any of the body is read: a HeadObject first would
            # cost a round trip per item and say the same. The body is read with a cap in case the header lies.
            response = self.s3.get_object(Bucket=bucket, Key=key)
            size = int(response.get("ContentLength") or 0)
            if size <= limit:
                data: bytes = response["Body"].read(limit + 1)
                size = len(data)
            response["Body"].close()
            check_media_bytes(uri, size, self.settings)
            return data
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _NOT_FOUND_CODES or status == 404:
                raise MediaNotFound(f"{uri} does not exist; check the bucket and key") from None
            if code in _FORBIDDEN_CODES or status == 403:
                raise MediaForbidden(
                    f"access to {uri} was denied; give the worker's credentials s3:GetObject"
                ) from None
            raise MediaUnavailable(f"S3 error reading {uri}: {code or status}; it will be retried") from None
        except BotoCoreError as exc:
            raise MediaUnavailable(f"could not reach S3 for {uri}: {exc}; it will be retried") from None

    def _fetch_file(self, uri: str) -> bytes:
        if not self.settings.allow_local_files:
            raise MediaForbidden(
                "file:// media is disabled on this worker; set VLMQ_ALLOW_LOCAL_FILES=true to allow it"
            )
        path = Path(unquote(urlparse(uri).path))
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise MediaNotFound(f"{uri} is not a regular file")
            check_media_bytes(uri, size, self.settings)
            return path.read_bytes()
        except FileNotFoundError:
            raise MediaNotFound(f"{uri} does not exist on the worker") from None
        except PermissionError:
            raise MediaForbidden(f"the worker may not read {uri}") from None
