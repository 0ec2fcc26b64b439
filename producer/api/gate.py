"""The request gate, in front of every route: bearer key, per-key rate and concurrency limits, body caps, metrics.

A pure ASGI middleware (no per-request task or body copy, unlike Starlette's BaseHTTPMiddleware). Order per request:
metrics timer → open path? → key (401) → concurrency (429), then rate (429 with Retry-After), both in Redis and shared
by every API process (`producer/api/limits.py`, one round trip) → route, whose body reads are counted against the
path's cap (413 as soon as the cap is passed, whatever Content-Length said).

Keys are compared with `hmac.compare_digest` against every configured key (the time taken does not say which one
nearly matched) and are never logged or used as labels: a key is known by its position, `key-<n>`.
"""

from __future__ import annotations

import hmac
import time

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api.errors import ApiError, redis_unavailable
from producer.api.limits import Limiter, fingerprint
from producer.api.settings import ApiSettings

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
LOCAL_KEY = "local"


class BodyTooLarge(HTTPException):
    """The request body passed its route's cap while it was being read."""

    def __init__(self, limit: int, code: str) -> None:
        super().__init__(413, f"the request body is larger than {limit:,} bytes, the limit for this route")
        self.code = code


class Metrics:
    """Requests by route template and status, and their latency, in the API's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vlmq_api_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "vlmq_api_request_seconds",
            "Time to answer a request (long polls included)",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )

        self.in_flight = Gauge(
            "vlmq_api_requests_in_flight",
            "Authenticated requests being answered (long polls included)",
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class Gate:
    """The middleware; `settings.api_keys` empty means no authentication (only with the local-only flag)."""

    def __init__(self, app: ASGIApp, settings: ApiSettings, metrics: Metrics, limiter: Limiter) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.limiter = limiter
        self.keys = [k.encode() for k in settings.api_keys]
        # A key is `key-<n>` in metrics and messages, its fingerprint in Redis (the same in every replica).
        self.fingerprints = {f"key-{n}": fingerprint(k) for n, k in enumerate(self.keys)} | {LOCAL_KEY: LOCAL_KEY}
        self.caps = {
            "/media": (settings.max_media_bytes, "media_too_large"),
            "/v1/files": (settings.max_file_bytes + (1 << 16), "body_too_large"),
            "/manifests": (settings.max_file_bytes, "body_too_large"),
            "/v1/chat/completions": (settings.chat_body_bytes, "body_too_large"),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], route, status, time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            lease = await self.limiter.admit(self.fingerprints[self._key(scope)])
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        except redis.RedisError as exc:
            await redis_unavailable(exc).response()(scope, receive, send)
            return
        released = False

        async def release_then_send(message: Message) -> None:
            nonlocal released
            if message["type"] == "http.response.body" and not message.get("more_body") and not released:
                released = True  # the slot is free before the client can read the answer and send again
                await self.limiter.release(lease)
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self._capped(scope, receive, release_then_send)
        finally:
            self.metrics.in_flight.dec()
            if not released:
                await self.limiter.release(lease)

    def _key(self, scope: Scope) -> str:
        """The caller's key id (`key-<n>`), or 401."""
        if not self.keys:
            return LOCAL_KEY
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        found = None
        for n, key in enumerate(self.keys):
            if hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer":
                found = f"key-{n}"
        if found is None:
            what = "no API key was sent" if not header else "the API key is not valid"
            raise ApiError(
                401, "unauthorized", f"{what}; send `Authorization: Bearer <key>` with a key from VLMQ_API_KEYS"
            )
        return found

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the route with its body counted against the path's cap."""
        limit, code = self.caps.get(scope["path"], (self.settings.max_body_bytes, "body_too_large"))
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            error = BodyTooLarge(limit, code)
            await ApiError(413, code, str(error.detail)).response()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit, code)
            return message

        await self.app(scope, counted, send)
