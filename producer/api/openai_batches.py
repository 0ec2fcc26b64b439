"""OpenAI's Batch API over vlmq named batches: one OpenAI batch is one vlmq batch, named by the batch id.

    POST /v1/batches              {input_file_id, endpoint: /v1/chat/completions, completion_window: 24h, metadata}
    GET  /v1/batches/{id}         OpenAI's batch object: status, request_counts, output/error file ids
    GET  /v1/batches              the batches, newest first (`limit`, `after`)
    POST /v1/batches/{id}/cancel  requests not started end cancelled; the batch is `cancelling`, then `cancelled`

Each input line becomes a chat job (`<batch id>.<line>`, its custom_id in the job's metadata); a line whose body
breaks the contract (or names media the workers would refuse) never becomes a job and goes to the error file
(`producer/api/openai_batch_input.py`). The input file is read from the staging bucket a line at a time, twice:
once to count its lines, then to turn them into jobs, which are sent as they come, so the API process never holds
the file.
Status: `validating` while the lines become jobs (after the create request is answered; `failed`, with `errors`,
when the file cannot be read or has more than 50,000 lines), `in_progress` while jobs run (`cancelling` once
cancelled), `completed` (or `cancelled`) once every job has ended and the output and error files are written.
request_counts: `completed` = succeeded requests, `failed` = the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from producer.api.errors import ApiError
from producer.api.openai_batch_input import ENDPOINT, Rejected, count_requests, jobs_of
from producer.api.openai_chat import completion
from producer.api.openai_files import Files
from producer.api.services import Services, services
from producer.core.jobs import Job, JobResult

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])
BatchId = Annotated[str, Path(pattern=r"^batch_[A-Za-z0-9]{1,64}$")]


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def _error_line(line: Rejected) -> dict[str, Any]:
    response = {"status_code": line.status, "request_id": None, "body": {"error": line.error}}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": response, "error": None}


def _result_line(result: JobResult, created: int, model: str) -> tuple[bool, dict[str, Any]]:
    custom_id = result.metadata.get("custom_id")
    if result.ok:
        body = completion(result, created, int(result.metadata.get("max_tokens", 0)) or 1 << 30, model)
        response = {"status_code": 200, "request_id": result.id, "body": body}
    else:
        error = ApiError.from_job_error(result.error) if result.error else ApiError(500, "internal", "no error given")
        response = {"status_code": error.status, "request_id": result.id, "body": error.body()}
    return result.ok, {"id": f"batch_req_{result.id}", "custom_id": custom_id, "response": response, "error": None}


# The fields of OpenAI's batch object that a batch not started yet has empty.
_BLANK: dict[str, Any] = {
    "object": "batch",
    "endpoint": ENDPOINT,
    "completion_window": "24h",
    "output_file_id": None,
    "error_file_id": None,
    "in_progress_at": None,
    "finalizing_at": None,
    "completed_at": None,
    "expired_at": None,
    "cancelled_at": None,
}


class OpenAIBatches:
    """The OpenAI batch records in Redis, and the files they end with."""

    def __init__(self, api: Services) -> None:
        self.api = api
        self.redis = api.client.ledger.redis
        self.keys = api.client.ledger.keys
        self.files = Files(api.settings, api.client.s3)

    def record(self, batch_id: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.redis.hgetall(self.keys.openai_batch(batch_id))  # type: ignore[assignment]
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if not fields:
            raise ApiError(404, "not_found", f"no batch {batch_id!r}", param="batch_id")
        return fields

    def create(self, batch_id: str, body: BatchCreate) -> None:
        """The batch's record, `validating` until its lines are jobs (`submit`) or it has failed (`fail`)."""
        self.files.get(body.input_file_id)  # 404 now for a file that does not exist
        created = int(time.time())
        self.redis.hset(
            self.keys.openai_batch(batch_id),
            mapping={
                "input_file_id": body.input_file_id,
                "created_at": created,
                "metadata": json.dumps(body.metadata),
                "total": 0,
                "rejected": "[]",
            },
        )
        self.redis.zadd(self.keys.openai_batches(), {batch_id: created})

    def count(self, batch_id: str, file_id: str) -> None:
        """Read the input file once: refuse it when it has too many lines, else record how many requests it holds."""
        requests = count_requests(self.files.lines(file_id, self.api.settings.chat_body_bytes))
        self.redis.hset(self.keys.openai_batch(batch_id), "total", requests)

    def submit(self, batch_id: str, jobs: Iterable[Job]) -> None:
        """Send the batch's jobs as the vlmq batch `batch_id`, as they come; a cancel that came while validating
        applies now."""
        self.api.client.submit_batch(batch_id, jobs, progress=False)
        if self.redis.hexists(self.keys.openai_batch(batch_id), "cancel_requested_at"):
            self.api.client.batch(batch_id).cancel()

    def reject(self, batch_id: str, rejected: list[Rejected]) -> None:
        """Record the lines that never became jobs (before the batch's submission closes: its end reads them)."""
        self.redis.hset(self.keys.openai_batch(batch_id), "rejected", json.dumps([r.model_dump() for r in rejected]))

    def fail(self, batch_id: str, error: ApiError) -> None:
        """The batch could not start (its file is unreadable or too long): status `failed`, with the reason. Jobs
        already sent (the file stopped being readable half-way) end `cancelled` unless a worker took them."""
        errors = {"object": "list", "data": [{"code": error.code, "message": error.message, "param": error.param}]}
        self.redis.hset(
            self.keys.openai_batch(batch_id), mapping={"failed_at": int(time.time()), "errors": json.dumps(errors)}
        )
        if self.api.client.batch(batch_id).status().status != "unknown":
            self.api.client.batch(batch_id).cancel()

    def cancel(self, batch_id: str) -> dict[str, Any]:
        self.record(batch_id)
        self.redis.hsetnx(self.keys.openai_batch(batch_id), "cancel_requested_at", int(time.time()))
        if self.api.client.batch(batch_id).status().status != "unknown":  # else `submit` cancels it once sent
            self.api.client.batch(batch_id).cancel()
        return self.view(batch_id)

    def _finalize(self, batch_id: str, fields: dict[str, str]) -> dict[str, str]:
        """Write the output and error files of an ended batch (once; writing again gives the same files)."""
        created = int(fields["created_at"])
        rejected = [Rejected.model_validate(r) for r in json.loads(fields["rejected"])]
        errors: list[tuple[int, dict[str, Any]]] = [(r.line, _error_line(r)) for r in rejected]
        out: list[bytes] = []
        for result in self.api.client.batch(batch_id).ended():
            if result is None:
                continue
            ok, line = _result_line(result, created, self.api.settings.model)
            if ok:
                out.append(json.dumps(line).encode() + b"\n")
            else:
                errors.append((int(result.id.rsplit(".", 1)[1]), line))
        error_lines = [json.dumps(line).encode() + b"\n" for _, line in sorted(errors, key=lambda e: e[0])]
        ids = {"output_file_id": f"file-{batch_id}-output", "error_file_id": f"file-{batch_id}-errors"}
        self.files.put(b"".join(out), f"{batch_id}_output.jsonl", "batch_output", ids["output_file_id"])
        self.files.put(b"".join(error_lines), f"{batch_id}_errors.jsonl", "batch_output", ids["error_file_id"])
        done = {**ids, "finalized_at": str(int(time.time()))}
        for field, value in done.items():
            self.redis.hset(self.keys.openai_batch(batch_id), field, value)
        return {**fields, **done}

    def _not_started(self, batch_id: str, fields: dict[str, str]) -> dict[str, Any]:
        """A batch still validating its lines, or one that failed to start."""
        failed = "failed_at" in fields
        created = int(fields["created_at"])
        cancelling = fields.get("cancel_requested_at")
        return {
            **_BLANK,
            "id": batch_id,
            "input_file_id": fields["input_file_id"],
            "status": "failed" if failed else "cancelling" if cancelling else "validating",
            "errors": json.loads(fields["errors"]) if failed else None,
            "created_at": created,
            "expires_at": created + 24 * 3600,
            "failed_at": int(fields["failed_at"]) if failed else None,
            "cancelling_at": int(cancelling) if cancelling else None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": json.loads(fields["metadata"]),
        }

    def view(self, batch_id: str) -> dict[str, Any]:
        """OpenAI's batch object."""
        fields = self.record(batch_id)
        status = self.api.client.batch(batch_id).status()
        if "failed_at" in fields or status.status == "unknown":
            return self._not_started(batch_id, fields)
        ended = status.status not in ("submitting", "running")
        if ended and "finalized_at" not in fields:
            fields = self._finalize(batch_id, fields)
        rejected = len(json.loads(fields["rejected"]))
        created = int(fields["created_at"])
        raw_cancel: bytes | None = self.redis.hget(self.keys.batch(batch_id), "cancelled_at")  # type: ignore[assignment]
        cancelling_at = int(datetime.fromisoformat(raw_cancel.decode()).timestamp()) if raw_cancel else None
        if "cancel_requested_at" in fields:
            cancelling_at = int(fields["cancel_requested_at"])
        cancelled = status.cancelled > 0 or cancelling_at is not None
        name = ("cancelled" if cancelled else "completed") if ended else ("cancelling" if cancelled else "in_progress")
        finished = int(fields["finalized_at"]) if ended else None
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "errors": None,
            "input_file_id": fields["input_file_id"],
            "completion_window": "24h",
            "status": name,
            "output_file_id": fields.get("output_file_id"),
            "error_file_id": fields.get("error_file_id"),
            "created_at": created,
            "in_progress_at": created,
            "expires_at": created + 24 * 3600,
            "finalizing_at": finished,
            "completed_at": finished if name == "completed" else None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": cancelling_at,
            "cancelled_at": finished if name == "cancelled" else None,
            "request_counts": {
                "total": int(fields["total"]),
                "completed": status.succeeded,
                "failed": status.failed + status.cancelled + rejected,
            },
            "metadata": json.loads(fields["metadata"]),
        }


def batches(api: Annotated[Services, Depends(services)]) -> OpenAIBatches:
    return OpenAIBatches(api)


@router.post("/batches", summary="create a batch from an uploaded file")
async def create_batch(
    body: BatchCreate, api: Annotated[Services, Depends(services)], store: Annotated[OpenAIBatches, Depends(batches)]
) -> dict[str, Any]:
    if body.endpoint != ENDPOINT:
        raise ApiError(400, "unsupported_parameter", f"only endpoint {ENDPOINT} is supported", param="endpoint")
    if body.completion_window != "24h":
        raise ApiError(400, "unsupported_parameter", "completion_window must be 24h", param="completion_window")
    batch_id = f"batch_{uuid.uuid4().hex}"
    await run_in_threadpool(store.create, batch_id, body)
    task = asyncio.create_task(_validate_and_send(api, store, batch_id, body.input_file_id))
    _VALIDATING.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_VALIDATING.discard)
    return await run_in_threadpool(store.view, batch_id)


_VALIDATING: set[asyncio.Task[None]] = set()


async def _validate_and_send(api: Services, store: OpenAIBatches, batch_id: str, file_id: str) -> None:
    """Turn the input file's lines into jobs (a bad line becomes an error line) and send them; the request that
    created the batch has been answered (`validating`) already."""
    try:
        await run_in_threadpool(store.count, batch_id, file_id)
        jobs = _jobs(store, batch_id, file_id, asyncio.get_running_loop())
        # A thread of asyncio's own pool, not Starlette's: it waits on the loop, which stages data: URL images in
        # Starlette's pool; were both the same, enough batches at once could hold every thread and wait for ever.
        await asyncio.to_thread(store.submit, batch_id, jobs)
    except Exception as exc:
        log.exception("batch %s could not start", batch_id)
        error = exc if isinstance(exc, ApiError) else ApiError(500, "internal", f"{type(exc).__name__}: {exc}")
        await run_in_threadpool(store.fail, batch_id, error)


def _jobs(store: OpenAIBatches, batch_id: str, file_id: str, loop: asyncio.AbstractEventLoop) -> Iterator[Job]:
    """The batch's jobs from its input file, read in this thread; once the last line is read, the lines that never
    became jobs are recorded (before the batch's submission closes, which lets it end)."""
    rejected: list[Rejected] = []
    lines = store.files.lines(file_id, store.api.settings.chat_body_bytes)
    yield from jobs_of(store.api, batch_id, lines, loop, rejected)
    store.reject(batch_id, rejected)


@router.get("/batches/{batch_id}", summary="a batch")
async def retrieve_batch(batch_id: BatchId, store: Annotated[OpenAIBatches, Depends(batches)]) -> dict[str, Any]:
    return await run_in_threadpool(store.view, batch_id)


@router.get("/batches", summary="the batches, newest first")
async def list_batches(
    store: Annotated[OpenAIBatches, Depends(batches)],
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict[str, Any]:
    def page() -> dict[str, Any]:
        found: list[bytes] = store.redis.zrevrange(store.keys.openai_batches(), 0, -1)  # type: ignore[assignment]
        ids = [i.decode() for i in found]
        if after in ids:
            ids = ids[ids.index(after) + 1 :]
        data = [store.view(i) for i in ids[:limit]]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": len(ids) > limit}

    return await run_in_threadpool(page)


@router.post("/batches/{batch_id}/cancel", summary="cancel a batch")
async def cancel_batch(batch_id: BatchId, store: Annotated[OpenAIBatches, Depends(batches)]) -> dict[str, Any]:
    return await run_in_threadpool(store.cancel, batch_id)
