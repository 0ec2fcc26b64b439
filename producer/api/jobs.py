"""Native job routes: submit, status and result (long-poll), cancel, and media uploads.

POST /jobs                    a Job (the wire contract) -> 202 {id, status, status_url}; the same id again -> 200
GET  /jobs/{id}?wait=S        {id, status, result}; waits up to S seconds (at most VLMQ_MAX_WAIT_S) for the end
POST /jobs/{id}/cancel        a job no worker has taken ends `cancelled` -> 200; else 409 not_cancellable
POST /media                   the body is an image or video -> 201 {uri: s3://..., kind, content_type, bytes}
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from producer.api.errors import ApiError
from producer.api.services import Services, services
from producer.api.waiting import Seen, State
from producer.core.jobs import JOB_ID_PATTERN, Job, JobResult, MediaKind

router = APIRouter(tags=["jobs"])
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the job's id")]


class Accepted(BaseModel):
    """A submitted job: its id, where to read its state, and whether an earlier request had sent it already."""

    id: str
    status: State
    status_url: str
    duplicate: bool = False


class JobStatus(BaseModel):
    """A job's state (`queued`, `running`, `succeeded`, `failed`), and its result once it has ended."""

    id: str
    status: State
    result: JobResult | None = None


class Staged(BaseModel):
    """An uploaded image or video, stored in the staging bucket: use `uri` in a job's media."""

    uri: str
    kind: MediaKind
    content_type: str
    bytes: int


def _status(job_id: str, seen: Seen) -> JobStatus:
    if seen.state == "unknown":
        raise ApiError(404, "not_found", f"no job {job_id!r} is queued, running or stored", param="id")
    return JobStatus(id=job_id, status=seen.state, result=seen.result)


@router.post("/jobs", status_code=202, summary="submit a job", response_model=Accepted)
async def submit_job(
    job: Job,
    response: Response,
    api: Annotated[Services, Depends(services)],
    priority: Annotated[Literal["interactive", "bulk"], Query(description="the queue it goes to")] = "interactive",
) -> Accepted:
    """Enqueue a job (the contract's Job JSON). A job whose `id` is already queued, running or succeeded is not
    sent again: the answer is 200 with `duplicate: true`. Give `id` to make retries of this request safe."""
    await api.stager.check_job(job)
    sent = await api.submitter.send(job, priority)
    url = f"/jobs/{job.id}"
    if not sent:
        response.status_code = 200
        seen = await api.waiter.state(job.id)
        state: State = "queued" if seen.state == "unknown" else seen.state  # another request is sending it now
        return Accepted(id=job.id, status=state, status_url=url, duplicate=True)
    return Accepted(id=job.id, status="queued", status_url=url)


@router.get("/jobs/{job_id}", summary="a job's state and result", name="job_status")
async def job_status(
    job_id: JobId,
    api: Annotated[Services, Depends(services)],
    wait: Annotated[float, Query(ge=0, description="seconds to wait for the end (capped at VLMQ_MAX_WAIT_S)")] = 0,
) -> JobStatus:
    """The job's state; with `wait`, answers as soon as it ends or after `wait` seconds."""
    timeout = min(wait, api.settings.max_wait_s)
    seen = await (api.waiter.wait(job_id, timeout) if timeout else api.waiter.state(job_id))
    return _status(job_id, seen)


@router.post("/jobs/{job_id}/cancel", summary="cancel a job that has not started")
async def cancel_job(job_id: JobId, api: Annotated[Services, Depends(services)]) -> JobStatus:
    """A job still in its queue ends `cancelled` without running; one a worker has taken runs to its end (409)."""
    result = await run_in_threadpool(api.client.cancel, job_id)
    if result is not None:
        return JobStatus(id=job_id, status="failed", result=result)
    seen = await api.waiter.state(job_id)
    _status(job_id, seen)
    raise ApiError(
        409, "not_cancellable", f"job {job_id} is {seen.state}: only a job no worker has taken can be cancelled"
    )


@router.post(
    "/media",
    status_code=201,
    summary="upload an image or video",
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}},
)
async def upload_media(request: Request, api: Annotated[Services, Depends(services)]) -> Staged:
    """The request body is the file itself (`curl --data-binary @cat.jpg`), at most VLMQ_MAX_MEDIA_BYTES; its type
    is read from its first bytes. The answer's `uri` goes into a job's `media`."""
    uri, kind, size = await api.stager.upload(request.stream())
    return Staged(uri=uri, kind=kind.kind, content_type=kind.content_type, bytes=size)
