"""Every error `vlmq api` answers, native routes and OpenAI routes alike, in OpenAI's error shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages.0.content", "code": "..."}}

`code` is vlmq's: a job error code (`media_forbidden`, `media_too_large`, `invalid_job`, ...) or one of the API's
own (`unauthorized`, `rate_limited`, `body_too_large`, `not_found`, `not_cancellable`, `timeout`, ...).

ApiError                     raised by routes and the request gate; one status, one code, one message
"""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from producer.core.jobs import JobError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}

# The HTTP status of a job that ended failed with a vlmq error code (a chat completion answers with it).
JOB_ERROR_STATUS = {
    "invalid_job": 400,
    "media_not_found": 400,
    "media_forbidden": 400,
    "media_unsupported": 400,
    "media_undecodable": 400,
    "media_too_large": 413,
    "media_unavailable": 502,
    "expired": 504,
    "cancelled": 409,
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str = Field(description="vlmq's error code: a job error code, or the API's own")


class ErrorBody(BaseModel):
    """Every error answer, on every route (OpenAI's shape)."""

    error: ErrorDetail


# The answers every authenticated route may give, for /openapi.json.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in (
        (401, "no key, or a wrong one"),
        (413, "the body is over its cap"),
        (422, "the body breaks the schema: `param` names the first bad field"),
        (429, "over this key's rate or concurrency limit; see Retry-After"),
        (503, "Redis or the staging bucket is not available"),
    )
}


class ApiError(Exception):
    """An answer other than success: an HTTP status, vlmq's error code, a message that says what to do."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers

    @classmethod
    def from_job_error(cls, error: JobError, param: str | None = None) -> ApiError:
        return cls(JOB_ERROR_STATUS.get(error.code, 500), error.code, error.message, param=param)

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """A pydantic error location without FastAPI's leading `body`/`query`: `messages.0.content`."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def invalid(errors: list[Any], code: str = "invalid_request") -> ApiError:
    """A 422 naming every bad field (the first one as `param`)."""
    described = []
    for error in errors:
        where = field_path(error.get("loc", ()))
        message = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":  # its location is a character position, not a field
            message = f"the body is not valid JSON at character {where} ({error.get('ctx', {}).get('error', message)})"
            where = ""
        described.append(f"{where}: {message}" if where else message)
    first = field_path(errors[0].get("loc", ())) if errors and errors[0].get("type") != "json_invalid" else None
    return ApiError(422, code, "; ".join(described) or "invalid request", param=first or None)


def redis_unavailable(exc: redis.RedisError) -> ApiError:
    """The answer when Redis cannot be reached (503: nothing was done)."""
    message = f"Redis could not be reached ({type(exc).__name__}); nothing was done, try again"
    return ApiError(503, "unavailable", message, headers={"Retry-After": "1"})


def install(app: FastAPI) -> None:
    """Answer every error in the one shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        code = "invalid_job" if request.url.path == "/jobs" else "invalid_request"
        error = invalid(list(exc.errors()), code=code)
        content_type = request.headers.get("content-type", "")
        if content_type and "json" not in content_type and "multipart" not in content_type:
            error.message += f" (the body was sent as {content_type}: send JSON, Content-Type: application/json)"
        return error.response()

    @app.exception_handler(ValidationError)
    async def _job_invalid(request: Request, exc: ValidationError) -> JSONResponse:
        return invalid(list(exc.errors()), code="invalid_job").response()

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return redis_unavailable(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return ApiError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {})).response()
