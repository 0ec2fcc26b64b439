"""OpenAI's Files API, for the Batch API: input files in, output and error files out, all in the staging bucket.

    POST /v1/files                multipart `file` and `purpose` (batch) -> the file object
    GET  /v1/files/{id}           the file object
    GET  /v1/files/{id}/content   the file's bytes (streamed)
    GET  /v1/files                the newest files (`limit`)
    DELETE /v1/files/{id}         delete a file

A file is one S3 object, `<VLMQ_STAGING_PREFIX>files/<id>`; its name, purpose and creation time are the object's
metadata, so nothing about files is kept in Redis. No file is ever held whole in the API process: an upload is
spooled (past 1 MiB to the system's temporary directory, by Starlette's form parser) and sent to S3 a part at a time,
and a batch reads its input file back a line at a time (`Files.lines`).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import IO, Annotated, Any

from botocore.exceptions import ClientError
from fastapi import APIRouter, Depends, Form, Path, Query, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from producer.api.errors import ApiError
from producer.api.media import UPLOAD
from producer.api.services import Services, services
from producer.api.settings import ApiSettings

router = APIRouter(prefix="/v1", tags=["openai"])
FILE_ID = r"^file-[A-Za-z0-9_-]{1,100}$"
FileId = Annotated[str, Path(pattern=FILE_ID)]
READ_BYTES = 1 << 20  # what a batch reads of its input file at a time


class Files:
    """The staging bucket's files."""

    def __init__(self, settings: ApiSettings, s3: Any) -> None:
        self.settings = settings
        self.s3 = s3

    def key(self, file_id: str) -> tuple[str, str]:
        if not self.settings.bucket:
            raise ApiError(503, "no_staging_bucket", "set VLMQ_STAGING_BUCKET (or VLMQ_RESULTS_BUCKET) to keep files")
        return self.settings.bucket, f"{self.settings.staging_prefix}files/{file_id}"

    def put(self, body: IO[bytes] | bytes, filename: str, purpose: str, file_id: str | None = None) -> dict[str, Any]:
        file_id = file_id or f"file-{uuid.uuid4().hex}"
        bucket, key = self.key(file_id)
        created = int(time.time())
        meta = {"filename": re.sub(r"[^\x20-\x7e]", "_", filename)[:200], "purpose": purpose, "created": str(created)}
        if isinstance(body, bytes):
            self.s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata=meta)
        else:
            self.s3.upload_fileobj(body, bucket, key, ExtraArgs={"Metadata": meta}, Config=UPLOAD)
        return self.get(file_id)

    def get(self, file_id: str) -> dict[str, Any]:
        """OpenAI's file object, or 404."""
        bucket, key = self.key(file_id)
        try:
            head = self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ApiError(404, "not_found", f"no file {file_id!r}", param="file_id") from None
            raise
        meta = head.get("Metadata", {})
        return {
            "id": file_id,
            "object": "file",
            "bytes": int(head["ContentLength"]),
            "created_at": int(meta.get("created", 0)),
            "filename": meta.get("filename", file_id),
            "purpose": meta.get("purpose", "batch"),
            "status": "processed",
            "status_details": None,
        }

    def lines(self, file_id: str, most: int, read_bytes: int = READ_BYTES) -> Iterator[bytes | None]:
        """The file's lines (with their line ends), read from S3 `read_bytes` at a time; None for a line longer than
        `most` bytes, which is not kept (a line is held whole only up to `most`)."""
        self.get(file_id)
        bucket, key = self.key(file_id)
        line, too_long = bytearray(), False
        for chunk in self.s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(read_bytes):
            start = 0
            while start < len(chunk):
                end = chunk.find(b"\n", start)
                piece = chunk[start:] if end < 0 else chunk[start : end + 1]
                too_long = too_long or len(line) + len(piece) > most
                if too_long:
                    line = bytearray()  # dropped: only its being too long is reported
                else:
                    line += piece
                if end < 0:
                    break
                yield None if too_long else bytes(line)
                line, too_long, start = bytearray(), False, end + 1
        if line or too_long:
            yield None if too_long else bytes(line)

    def newest(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` files."""
        bucket, prefix = self.key("")
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [o for page in pages for o in page.get("Contents", [])]
        newest = sorted(objects, key=lambda o: o["LastModified"], reverse=True)[:limit]
        return [self.get(o["Key"][len(prefix) :]) for o in newest]

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        bucket, key = self.key(file_id)
        self.s3.delete_object(Bucket=bucket, Key=key)
        return {"id": file_id, "object": "file", "deleted": True}

    def chunks(self, file_id: str) -> Iterator[bytes]:
        bucket, key = self.key(file_id)
        yield from self.s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 16)


def files(api: Annotated[Services, Depends(services)]) -> Files:
    return Files(api.settings, api.client.s3)


@router.post("/files", summary="upload a file (purpose batch)")
async def create_file(
    file: UploadFile, purpose: Annotated[str, Form()], store: Annotated[Files, Depends(files)]
) -> dict[str, Any]:
    """A Batch API input file: JSONL, one request per line, at most VLMQ_MAX_FILE_BYTES."""
    if purpose != "batch":
        raise ApiError(400, "unsupported_parameter", "only purpose `batch` is supported", param="purpose")
    return await run_in_threadpool(store.put, file.file, file.filename or "upload.jsonl", purpose)


@router.get("/files", summary="the newest files")
async def list_files(
    store: Annotated[Files, Depends(files)], limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    return {"object": "list", "data": await run_in_threadpool(store.newest, limit), "has_more": False}


@router.delete("/files/{file_id}", summary="delete a file")
async def delete_file(file_id: FileId, store: Annotated[Files, Depends(files)]) -> dict[str, Any]:
    return await run_in_threadpool(store.delete, file_id)


@router.get("/files/{file_id}", summary="a file's object")
async def retrieve_file(file_id: FileId, store: Annotated[Files, Depends(files)]) -> dict[str, Any]:
    return await run_in_threadpool(store.get, file_id)


@router.get("/files/{file_id}/content", summary="a file's content", response_class=StreamingResponse)
async def file_content(file_id: FileId, store: Annotated[Files, Depends(files)]) -> StreamingResponse:
    await run_in_threadpool(store.get, file_id)
    return StreamingResponse(store.chunks(file_id), media_type="application/octet-stream")
