"""The ASGI app of `vlmq api`: FastAPI routes over `producer.Client`, behind the request gate.

Routes stay thin; the client (and its ledger, batch store and result reader) does the work, as for the CLI.
Open without a key: /healthz, /readyz, /metrics, /openapi.json, /docs. Everything else needs a bearer key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from producer.api.errors import ERROR_RESPONSES
from producer.api.errors import install as install_error_handlers
from producer.api.gate import Gate, Metrics
from producer.api.limits import Limiter
from producer.api.media import Stager
from producer.api.services import AUTH, Services, services
from producer.api.settings import ApiSettings
from producer.api.submitter import Submitter
from producer.api.waiting import Waiter
from producer.client import Client

DESCRIPTION = """vlmq's HTTP front door: submit vision-language jobs, read their results, stage media, run named
batches, and use OpenAI's chat completions and Batch API with the official SDKs (`base_url=http://host:port/v1`).
Send `Authorization: Bearer <key>` with a key from `VLMQ_API_KEYS`. Every error is
`{"error": {"message", "type", "param", "code"}}`, with vlmq's error code in `code`."""


def _ready(client: Client) -> dict[str, str]:
    """What is not reachable: Redis (broker), S3 (the results bucket)."""
    problems = {}
    try:
        client.ledger.redis.ping()
    except Exception as exc:
        problems["redis"] = f"{type(exc).__name__}: {exc}"
    bucket = client.settings.results_bucket
    if bucket:
        try:
            client.s3.head_bucket(Bucket=bucket)
        except Exception as exc:
            problems["s3"] = f"{type(exc).__name__}: {exc}"
    return problems


def _health_routes(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/healthz", tags=["operations"], summary="the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Redis and S3 are reachable", response_model=None)
    async def readyz(request: Request) -> JSONResponse | dict[str, Any]:
        problems = await run_in_threadpool(_ready, services(request).client)
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: ApiSettings | None = None, client: Client | None = None) -> FastAPI:
    """The app; `settings` default to the environment, `client` to one built from them."""
    from producer.api.batches import router as batches
    from producer.api.jobs import router as jobs
    from producer.api.openai_batches import router as openai_batches
    from producer.api.openai_chat import router as openai_chat
    from producer.api.openai_files import router as openai_files

    settings = settings or ApiSettings()
    client = client or Client(settings)
    shared = Services(settings, client, Stager(settings, client.s3), Waiter(client), Submitter(client))
    limiter = Limiter(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        shared.submitter.close()
        await shared.waiter.close()
        await limiter.close()

    app = FastAPI(title="vlmq", description=DESCRIPTION, version="0.1.0", lifespan=lifespan, redoc_url=None)
    app.state.services = shared
    metrics = Metrics()
    app.add_middleware(Gate, settings=settings, metrics=metrics, limiter=limiter)
    install_error_handlers(app)
    _health_routes(app, metrics)
    for router in (jobs, batches, openai_chat, openai_files, openai_batches):
        app.include_router(router, dependencies=AUTH, responses=ERROR_RESPONSES)
    return app
