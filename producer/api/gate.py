"""The request gate, in front of every route: bearer key, per-key rate and concurrency limits, body caps, metrics.

A pure ASGI middleware (no per-request task or body copy, unlike Starlette's BaseHTTPMiddleware). Order per request:
metrics timer → open path? → key (401) → concurrency (429) → rate (429 with Retry-After) → route, whose body reads
are counted against the path's cap (413 as soon as the cap is passed, whatever Content-Length said).

Keys are compared with `hmac.compare_digest` against every configured key (the time taken does not say which one
nearly matched) and are never logged or used as labels: a key is known by its position, `key-<n>`.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api.errors import ApiError
from producer.api.settings import ApiSettings

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
LOCAL_KEY = "local"


class BodyTooLarge(HTTPException):
    """The request body passed its route's cap while it was being read."""

    def __init__(self, limit: int, code: str) -> None:
        super().__init__(413, f"the request body is larger than {limit:,} bytes, the limit for this route")
        self.code = code


@dataclass
class TokenBucket:
    """`rate` requests per second, `burst` at once; one per key."""

    rate: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens, self.stamp = float(self.burst), self.clock()

    def take(self) -> float:
        """0 when a request may go now, else the seconds until one may."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


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

    def __init__(self, app: ASGIApp, settings: ApiSettings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.keys = [k.encode() for k in settings.api_keys]
        self.buckets: dict[str, TokenBucket] = {}
        self.in_flight: dict[str, int] = {}
        media, body = settings.max_media_bytes, settings.max_body_bytes
        # A data: URL is base64 (4 bytes per 3): a chat body may carry one full-size image and the rest.
        self.caps = {
            "/media": (media, "media_too_large"),
            "/v1/files": (settings.max_file_bytes + (1 << 16), "body_too_large"),
            "/manifests": (settings.max_file_bytes, "body_too_large"),
            "/v1/chat/completions": (body + math.ceil(media * 4 / 3), "body_too_large"),
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
            key = self._key(scope)
            self._limit(key)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        self.metrics.in_flight.inc()
        try:
            await self._capped(scope, receive, send)
        finally:
            self.in_flight[key] -= 1
            self.metrics.in_flight.dec()

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

    def _limit(self, key: str) -> None:
        if self.in_flight.get(key, 0) >= self.settings.max_concurrent_per_key:
            raise ApiError(
                429,
                "rate_limited",
                f"this key has {self.settings.max_concurrent_per_key} requests in flight, the most it may; "
                "wait for one to finish",
                headers={"Retry-After": "1"},
            )
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.settings.rate_limit_per_s, self.settings.rate_burst)
        wait_s = bucket.take()
        if wait_s:
            raise ApiError(
                429,
                "rate_limited",
                f"this key sends more than {self.settings.rate_limit_per_s:g} requests per second; "
                f"retry after {wait_s:.2f} s",
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )

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
