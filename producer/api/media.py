"""Media that comes through the API: uploads and `data:` URLs staged to S3, and URLs checked against the workers'
allow-lists before a job is enqueued.

Uploads are counted while they stream (never past `VLMQ_MAX_MEDIA_BYTES`), spooled in memory up to 8 MiB and in the
system's temporary directory past that, and typed by their first bytes, not by what the client says they are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import ip_address
from typing import IO, Any
from urllib.parse import urlsplit

from boto3.s3.transfer import TransferConfig
from starlette.concurrency import run_in_threadpool

from producer.api.errors import ApiError
from producer.api.settings import ApiSettings
from producer.core.jobs import Job, MediaKind, split_s3_uri
from producer.core.netguard import address_allowed, effective_address, parse_networks

SPOOL_BYTES = 8 << 20
# How uploads go to S3: boto3 holds up to 10 parts of 8 MiB of one upload in memory by default; 4 still overlap
# reading the spool and sending. (max_in_memory_upload_chunks is s3transfer's; boto3's constructor does not take it.)
UPLOAD = TransferConfig(multipart_chunksize=8 << 20, max_concurrency=4)
UPLOAD.max_in_memory_upload_chunks = 4
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Sniffed:
    """What the first bytes of a file say it is."""

    kind: MediaKind
    extension: str
    content_type: str


def sniff(head: bytes) -> Sniffed | None:
    """The media type of a file from its magic bytes (its first 64 are enough), or None for anything else."""
    if head.startswith(b"\xff\xd8\xff"):
        return Sniffed("image", ".jpg", "image/jpeg")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Sniffed("image", ".png", "image/png")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Sniffed("image", ".gif", "image/gif")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Sniffed("image", ".webp", "image/webp")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return Sniffed("video", ".avi", "video/x-msvideo")
    if head[:2] == b"BM" and len(head) >= 26:
        return Sniffed("image", ".bmp", "image/bmp")
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return Sniffed("image", ".tiff", "image/tiff")
    if head[4:8] == b"ftyp":
        if head[8:12] == b"qt  ":
            return Sniffed("video", ".mov", "video/quicktime")
        return Sniffed("video", ".mp4", "video/mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        if b"webm" in head[:64]:
            return Sniffed("video", ".webm", "video/webm")
        return Sniffed("video", ".mkv", "video/x-matroska")
    return None


def unsupported(what: str) -> ApiError:
    return ApiError(
        415,
        "media_unsupported",
        f"{what} is not an image or video vlmq reads (JPEG, PNG, GIF, WebP, BMP, TIFF; MP4, MOV, WebM, MKV, AVI)",
    )


class Stager:
    """Writes uploads to the staging bucket and checks media URLs; one per API process."""

    def __init__(self, settings: ApiSettings, s3: Any) -> None:
        self.settings = settings
        self.s3 = s3
        self.networks = parse_networks(settings.http_allowed_networks)

    def bucket(self) -> str:
        """The staging bucket, or 503 when none is configured."""
        if not self.settings.bucket:
            raise ApiError(503, "no_staging_bucket", "set VLMQ_STAGING_BUCKET (or VLMQ_RESULTS_BUCKET) to stage media")
        return self.settings.bucket

    async def upload(self, chunks: AsyncIterator[bytes]) -> tuple[str, Sniffed, int]:
        """Stream an upload to S3; returns its s3:// URI, its type and its size."""
        limit = self.settings.max_media_bytes
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            size, head = 0, b""
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "media_too_large", f"the upload is more than {limit:,} bytes, the limit")
                if len(head) < 64:
                    head += chunk[: 64 - len(head)]
                spool.write(chunk)
            if size == 0:
                raise ApiError(400, "media_undecodable", "the upload is empty")
            kind = sniff(head)
            if kind is None:
                raise unsupported("the upload")
            spool.seek(0)
            uri = await run_in_threadpool(self._put, spool, kind)
        return uri, kind, size

    def _put(self, body: IO[bytes], kind: Sniffed) -> str:
        bucket = self.bucket()
        key = f"{self.settings.staging_prefix}media/{uuid.uuid4().hex}{kind.extension}"
        self.s3.upload_fileobj(body, bucket, key, ExtraArgs={"ContentType": kind.content_type}, Config=UPLOAD)
        return f"s3://{bucket}/{key}"

    async def data_url(self, url: str, param: str, kind: MediaKind) -> str:
        """Stage a `data:<type>;base64,<bytes>` URL's bytes, which must be a `kind`; returns its s3:// URI."""
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, "invalid_job", "a data: URL must be data:<type>;base64,<data>", param=param)
        limit = self.settings.max_media_bytes
        if len(payload) * 3 // 4 > limit + 3:
            raise ApiError(413, "media_too_large", f"the data: URL holds more than {limit:,} bytes", param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "media_undecodable", "the data: URL is not valid base64", param=param) from None
        if len(data) > limit:
            raise ApiError(413, "media_too_large", f"the data: URL holds more than {limit:,} bytes", param=param)
        found = sniff(data[:64])
        if found is None:
            raise unsupported(f"the data: URL at {param}")
        if found.kind != kind:
            named = {"image": "an image", "video": "a video"}
            message = f"the data: URL holds {named[found.kind]}, not {named[kind]}"
            raise ApiError(400, "media_unsupported", message, param=param)

        async def one() -> AsyncIterator[bytes]:
            yield data

        uri, _, _ = await self.upload(one())
        return uri

    async def check_uri(self, uri: str, param: str) -> None:
        """Refuse a media URI the workers would refuse (media_forbidden), before any job is enqueued."""
        if uri.startswith("s3://"):
            bucket, _ = split_s3_uri(uri)
            allowed = self.settings.allowed_buckets
            if allowed and bucket not in allowed and bucket != self.settings.bucket:
                raise ApiError(400, "media_forbidden", f"bucket {bucket!r} is not in VLMQ_ALLOWED_BUCKETS", param=param)
            return
        if uri.startswith(("https://", "http://")):
            await self._check_http(uri, param)
            return
        raise ApiError(
            400,
            "media_forbidden",
            f"{uri.split(':', 1)[0]}: media is not accepted over HTTP; use s3:// or https://",
            param=param,
        )

    async def _check_http(self, uri: str, param: str) -> None:
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if not self.settings.allow_http_media:
            raise ApiError(
                400, "media_forbidden", f"{scheme} media is not enabled (VLMQ_ALLOW_HTTP_MEDIA)", param=param
            )
        if scheme == "http" and not self.settings.allow_plain_http:
            raise ApiError(400, "media_forbidden", f"{uri} is plain http; use https://", param=param)
        if "@" in parts.netloc:
            raise ApiError(400, "media_forbidden", f"{uri} has credentials in it; use a presigned URL", param=param)
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
            port = parts.port or DEFAULT_PORTS[scheme]
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (UnicodeError, ValueError, OSError) as exc:
            raise ApiError(400, "media_not_found", f"{uri} names no host that resolves ({exc})", param=param) from None
        for info in infos:
            address = str(effective_address(ip_address(str(info[4][0]))))
            if not address_allowed(address, self.networks):
                raise ApiError(
                    400,
                    "media_forbidden",
                    f"{uri} resolves to {address}, which is not a public address; add its network to "
                    "VLMQ_HTTP_ALLOWED_NETWORKS if the workers may read from it",
                    param=param,
                )

    async def check_job(self, job: Job) -> None:
        for n, media in enumerate(job.all_media()):
            await self.check_uri(media.uri, f"media.{n}")
