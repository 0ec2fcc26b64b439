"""Native named-batch routes: the `vlmq batch` commands over HTTP.

POST /manifests?format=jsonl|csv      the body is a manifest -> 201 {uri: s3://...}
POST /batches                         {name, manifest | prefix, ...} -> 202 the batch's status
GET  /batches/{name}                  counts per state, rate and ETA
GET  /batches/{name}/results          succeeded jobs' JobResults, JSONL in input order (streamed)
GET  /batches/{name}/errors           failed and cancelled jobs' JobResults, JSONL in input order (streamed)
POST /batches/{name}/cancel           jobs not started end `cancelled`
POST /batches/{name}/retry-failed     the failed jobs run again under their ids
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from producer.api.errors import ApiError
from producer.api.services import Services, services
from producer.batch import BatchHandle
from producer.client import Client
from producer.core.batches import BatchStatusName
from producer.core.jobs import JOB_ID_PATTERN, JobResult, split_s3_uri
from producer.errors import InvalidManifest
from producer.manifest import read_manifest, validate_manifest

log = logging.getLogger(__name__)
router = APIRouter(tags=["batches"])
Name = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the batch's name")]


class BatchRequest(BaseModel):
    """A named batch from a manifest (JSONL or CSV, uploaded with POST /manifests) or from every image and video
    under an S3 prefix."""

    name: str = Field(pattern=JOB_ID_PATTERN, description="submitting a name again resumes that batch")
    manifest: str | None = Field(None, description="s3://bucket/key.jsonl or .csv")
    prefix: str | None = Field(None, description="s3://bucket/prefix/: one job per image or video under it")
    glob: str | None = Field(None, description="with prefix: only keys matching this glob")
    defaults: dict[str, Any] = Field(default_factory=dict, description="job fields every line starts from")
    webhook: str | None = Field(None, description="URL that gets a signed POST when the batch ends")


class BatchView(BaseModel):
    """A batch's counts per state, with its rate (jobs ended per second) and the seconds it needs to end."""

    name: str
    status: BatchStatusName
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    created_at: str | None
    ended_at: str | None
    rate_per_s: float | None
    eta_s: float | None


def view(batch: BatchHandle) -> BatchView:
    s = batch.status()
    if s.status == "unknown":
        raise ApiError(404, "not_found", f"no batch named {s.name!r}", param="name")
    rate = eta = None
    if s.created_at and s.done:
        end = datetime.fromisoformat(s.ended_at) if s.ended_at else datetime.now(UTC)
        elapsed = (end - datetime.fromisoformat(s.created_at)).total_seconds()
        rate = s.done / elapsed if elapsed > 0 else None
        eta = (s.total - s.done) / rate if rate else None
    fields = s.to_json()
    return BatchView(**fields, rate_per_s=rate, eta_s=0.0 if s.ended_at else eta)


def _download(client: Client, uri: str) -> str:
    """A manifest object copied to a temporary file (read_manifest reads files); the caller removes it."""
    bucket, key = split_s3_uri(uri)
    suffix = os.path.splitext(key)[1].lower()
    if suffix not in (".jsonl", ".csv"):
        raise ApiError(400, "invalid_manifest", f"{uri}: a manifest is a .jsonl or .csv object", param="manifest")
    handle, path = tempfile.mkstemp(suffix=suffix)
    os.close(handle)
    try:
        client.s3.download_file(bucket, key, path)
    except Exception as exc:
        os.unlink(path)
        raise ApiError(400, "media_not_found", f"could not read {uri}: {exc}", param="manifest") from None
    return path


def _start(client: Client, body: BatchRequest) -> None:
    """Validate the whole manifest (422 listing bad lines, nothing sent), then send it from a thread."""
    if (body.manifest is None) == (body.prefix is None):
        raise ApiError(422, "invalid_request", "give exactly one of manifest and prefix", param="manifest")
    source = body.manifest or body.prefix or ""
    path = _download(client, source) if body.manifest else source
    options: dict[str, Any] = {"defaults": body.defaults, "glob": body.glob, "s3": client.s3}
    try:
        validate_manifest(path, batch=body.name, **options)
    except (InvalidManifest, ValueError) as exc:
        if body.manifest:
            os.unlink(path)
        raise ApiError(422, "invalid_manifest", str(exc), param="manifest") from None
    client.batches.begin(body.name, body.webhook)  # status reads `submitting` from now on

    def send() -> None:
        try:
            jobs = (job for _, job in read_manifest(path, batch=body.name, **options) if not isinstance(job, str))
            client.submit_batch(body.name, jobs, webhook=body.webhook, progress=False)
        except Exception:
            log.exception("batch %s: sending its jobs failed", body.name)
        finally:
            if body.manifest:
                os.unlink(path)

    threading.Thread(target=send, name=f"vlmq-batch-{body.name}", daemon=True).start()


@router.post("/manifests", status_code=201, summary="upload a batch manifest")
async def upload_manifest(
    request: Request,
    api: Annotated[Services, Depends(services)],
    format: Annotated[Literal["jsonl", "csv"], Query(description="the manifest's format")] = "jsonl",
) -> dict[str, str]:
    """The body is a JSONL (one job per line) or CSV manifest; the answer's `uri` goes into POST /batches."""
    bucket = api.stager.bucket()
    key = f"{api.settings.staging_prefix}manifests/{uuid.uuid4().hex}.{format}"
    with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
        async for chunk in request.stream():
            spool.write(chunk)
        spool.seek(0)
        await run_in_threadpool(api.client.s3.upload_fileobj, spool, bucket, key)
    return {"uri": f"s3://{bucket}/{key}"}


@router.post("/batches", status_code=202, summary="submit a named batch")
async def submit_batch(body: BatchRequest, api: Annotated[Services, Depends(services)]) -> BatchView:
    await run_in_threadpool(_start, api.client, body)
    return await run_in_threadpool(view, api.client.batch(body.name))


@router.get("/batches/{name}", summary="a batch's counts, rate and ETA")
async def batch_status(name: Name, api: Annotated[Services, Depends(services)]) -> BatchView:
    return await run_in_threadpool(view, api.client.batch(name))


def _lines(batch: BatchHandle, ok: bool) -> Iterator[str]:
    for result in batch.ended():
        if result is not None and result.ok == ok:
            yield result.model_dump_json() + "\n"


def _jsonl(api: Services, name: str, ok: bool) -> StreamingResponse:
    batch = api.client.batch(name)
    view(batch)  # 404 for an unknown batch
    return StreamingResponse(_lines(batch, ok), media_type="application/x-ndjson")


@router.get(
    "/batches/{name}/results",
    summary="succeeded jobs' results (JSONL)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {"schema": JobResult.model_json_schema()}}}},
)
async def batch_results(name: Name, api: Annotated[Services, Depends(services)]) -> StreamingResponse:
    return await run_in_threadpool(_jsonl, api, name, True)


@router.get("/batches/{name}/errors", summary="failed jobs' results (JSONL)", response_class=StreamingResponse)
async def batch_errors(name: Name, api: Annotated[Services, Depends(services)]) -> StreamingResponse:
    return await run_in_threadpool(_jsonl, api, name, False)


@router.post("/batches/{name}/cancel", summary="cancel the jobs not started yet")
async def cancel_batch(name: Name, api: Annotated[Services, Depends(services)]) -> BatchView:
    batch = api.client.batch(name)
    await run_in_threadpool(view, batch)
    await run_in_threadpool(batch.cancel)
    return await run_in_threadpool(view, batch)


@router.post("/batches/{name}/retry-failed", summary="run the failed jobs again under their ids")
async def retry_failed(name: Name, api: Annotated[Services, Depends(services)]) -> dict[str, list[str]]:
    batch = api.client.batch(name)
    await run_in_threadpool(view, batch)
    return {"retried": await run_in_threadpool(batch.retry_failed)}
