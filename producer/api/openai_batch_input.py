"""An OpenAI batch's input file, a line at a time: each line becomes a chat job, or a `Rejected` (its error line).

A line becomes a job when it is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}` with a
custom_id not seen before in the file and a body that is a chat completion request vlmq accepts (its data: URL
images staged to S3 as for /v1/chat/completions); any other line, or one longer than a chat completion's body may
be, is rejected with the error the same request would get there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from producer.api.errors import ApiError, invalid
from producer.api.openai_chat import ChatRequest, to_job
from producer.api.services import Services
from producer.core.jobs import Job

ENDPOINT = "/v1/chat/completions"
MAX_LINES = 50_000
CHUNK_LINES, CHUNK_BYTES = 256, 4 << 20  # lines turned into jobs at a time
Line = tuple[int, bytes | None]  # its number (from 1) and its bytes; None: longer than a request may be


class Rejected(BaseModel):
    """An input line that never became a job."""

    line: int
    custom_id: str | None
    status: int = 400
    error: dict[str, Any]


def _rejected(line: int, custom_id: str | None, error: ApiError) -> Rejected:
    return Rejected(line=line, custom_id=custom_id, status=error.status, error=error.body()["error"])


async def _line(api: Services, batch_id: str, n: int, raw: bytes | None, seen: set[str]) -> Job | Rejected:
    if raw is None:
        most = api.settings.chat_body_bytes
        why = f"line {n} is longer than {most:,} bytes, the most one request may be (as POST {ENDPOINT})"
        return _rejected(n, None, ApiError(413, "body_too_large", why))
    try:
        request = json.loads(raw)
    except ValueError as exc:
        return _rejected(n, None, ApiError(400, "invalid_request", f"line {n} is not JSON ({exc})"))
    custom_id = request.get("custom_id") if isinstance(request, dict) else None
    if not isinstance(custom_id, str) or custom_id in seen:
        why = "has no custom_id" if not isinstance(custom_id, str) else f"repeats custom_id {custom_id!r}"
        return _rejected(n, None, ApiError(400, "invalid_request", f"line {n} {why}", param="custom_id"))
    seen.add(custom_id)
    if request.get("url") != ENDPOINT or request.get("method", "POST") != "POST":
        return _rejected(n, custom_id, ApiError(400, "invalid_request", f"line {n}: url must be POST {ENDPOINT}"))
    try:
        chat = ChatRequest.model_validate(request.get("body"))
        meta = {"custom_id": custom_id, "max_tokens": str(chat.max_new_tokens)}
        return await to_job(chat, api.stager, f"{batch_id}.{n}", meta)
    except ValidationError as exc:
        return _rejected(n, custom_id, invalid(list(exc.errors()), code="invalid_job"))
    except ApiError as exc:
        return _rejected(n, custom_id, exc)


def count_requests(lines: Iterable[bytes | None]) -> int:
    """How many requests (lines that are not blank) an input file holds.

    Raises:
        ApiError: it has more than MAX_LINES lines.
    """
    requests = 0
    for n, raw in enumerate(lines, 1):
        requests += raw is None or bool(raw.strip())
        if n > MAX_LINES:
            raise ApiError(400, "invalid_request", f"more than {MAX_LINES:,} requests", param="input_file_id")
    return requests


def jobs_of(
    api: Services,
    batch_id: str,
    lines: Iterable[bytes | None],
    loop: asyncio.AbstractEventLoop,
    rejected: list[Rejected],
) -> Iterator[Job]:
    """The jobs of an input file's lines, in order, a chunk of lines at a time: run in a thread (reading the file
    blocks), while the lines become jobs on the event loop `loop` (that stages their data: URL images). The lines
    that do not become jobs are appended to `rejected`."""
    seen: set[str] = set()
    for chunk in _chunks(enumerate(lines, 1)):
        for item in asyncio.run_coroutine_threadsafe(_lines(api, batch_id, chunk, seen), loop).result():
            if isinstance(item, Job):
                yield item
            else:
                rejected.append(item)


def _chunks(lines: Iterable[Line]) -> Iterator[list[Line]]:
    """Numbered lines in chunks of at most CHUNK_LINES lines or CHUNK_BYTES bytes (blank lines left out)."""
    chunk: list[Line] = []
    size = 0
    for n, raw in lines:
        if raw is not None and not raw.strip():
            continue
        chunk.append((n, raw))
        size += len(raw or b"")
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


async def _lines(api: Services, batch_id: str, chunk: list[Line], seen: set[str]) -> list[Job | Rejected]:
    items = []
    for n, raw in chunk:
        items.append(await _line(api, batch_id, n, raw, seen))
        if n % 100 == 0:
            await asyncio.sleep(0)  # let other requests in
    return items
