"""Fetch http(s) media without letting a job reach into the worker's own network (SSRF).

A job names the URL, so without a guard any producer could make a worker read its cloud metadata endpoint
(169.254.169.254), a localhost admin port or an internal service, and get the bytes back as a caption. Here:

- https:// needs VLMQ_ALLOW_HTTP_MEDIA, http:// also VLMQ_ALLOW_PLAIN_HTTP; credentials in URLs are refused;
- the host is resolved once, refused if any of its addresses is not public (private, loopback, link-local,
  multicast, reserved, unspecified; IPv4 inside IPv6 included) unless inside VLMQ_HTTP_ALLOWED_NETWORKS, and the
  connection goes to that checked address, so a second DNS answer (DNS rebinding) cannot swap it; https still
  verifies the certificate against the host name;
- redirects are followed here, at most 5, each checked the same way;
- the body is streamed and cut off past VLMQ_MAX_MEDIA_BYTES, whatever Content-Length says;
- one download (name resolution, redirects, connects, TLS handshakes, response headers and body together) gets
  VLMQ_HTTP_DEADLINE_S: VLMQ_HTTP_TIMEOUT_S bounds each socket read, so without it a server sending a byte every
  few seconds (of its body, or of its headers) would hold a task slot forever, and so would a resolver that does
  not answer (getaddrinfo has no timeout of its own).

Any port is allowed: the address check, not the port, is what keeps internal services out.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as LookupTimeout
from contextlib import contextmanager, suppress
from ipaddress import ip_address
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, SSLError
from urllib3.util.ssl_match_hostname import CertificateError

from producer.core.netguard import address_allowed, effective_address, is_public, parse_networks
from worker.errors import MediaForbidden, MediaNotFound, MediaTooLarge, MediaUnavailable
from worker.media.limits import check_media_bytes
from worker.settings import WorkerSettings

try:  # Mozilla's CA bundle, as requests uses; without certifi, the system's store
    import certifi

    CA_CERTS: str | None = certifi.where()
except ImportError:  # pragma: no cover
    CA_CERTS = None

__all__ = ["HttpFetcher", "address_allowed", "is_public"]  # the address checks live in producer/core/netguard.py

MAX_REDIRECTS = 5
DEFAULT_PORTS = {"http": 80, "https": 443}
CHUNK_BYTES = 1 << 16
Resolve = Callable[..., list[Any]]  # socket.getaddrinfo's signature


class _Deadline(threading.local):
    """When the download this thread is running must be over (a `time.monotonic()` instant; None: none running)."""

    at: float | None = None


_DEADLINE = _Deadline()


@contextmanager
def _watched(connection: Any) -> Iterator[None]:
    """Shut the connection's socket down at the thread's download deadline: a read blocked in it wakes up at once
    (end of stream) instead of after its whole read timeout, or never, when the server trickles its bytes."""
    at = _DEADLINE.at
    if at is None:
        yield
        return
    timer = threading.Timer(max(0.0, at - time.monotonic()), _shut_down, (connection,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _shut_down(connection: Any) -> None:
    sock = connection.sock  # during a TLS handshake, the plain socket under it: shutting it down ends the handshake
    if sock is not None:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Watched:
    """A urllib3 connection whose connect (the TLS handshake included) and wait for the response headers end at the
    download deadline: http.client reads a status line and headers with one socket read after another, each allowed
    the whole read timeout."""

    def connect(self) -> None:
        with _watched(self):
            super().connect()  # type: ignore[misc]

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        with _watched(self):
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _DeadlineHTTPConnection(_Watched, HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


class HttpFetcher:
    """Reads http(s) media under the worker's settings. Thread-safe: one instance serves all task threads."""

    def __init__(
        self, settings: WorkerSettings, ca_certs: str | None = CA_CERTS, resolve: Resolve = socket.getaddrinfo
    ) -> None:
        self.settings = settings
        self.resolve = resolve
        # Lookups run here, so that a task thread waits for one no longer than its download's deadline.
        self.lookups = ThreadPoolExecutor(max_workers=settings.in_flight, thread_name_prefix="vlmq-dns")
        self.networks = parse_networks(settings.http_allowed_networks)
        # Pools are keyed by (scheme, address, port, and for https the host name): the address is already checked.
        self.pools = urllib3.PoolManager(
            num_pools=32,
            maxsize=settings.in_flight,
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_certs,
            timeout=urllib3.Timeout(connect=settings.http_timeout_s, read=settings.http_timeout_s),
            retries=False,
        )
        self.pools.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def fetch(self, uri: str) -> bytes:
        """The body of `uri`, following redirects; every refusal or failure is a coded `MediaError`."""
        deadline = _DEADLINE.at = time.monotonic() + self.settings.http_deadline_s
        try:
            url = uri
            for _ in range(MAX_REDIRECTS + 1):
                response = self._get(uri, url, deadline)
                location = response.get_redirect_location()
                if not location:
                    return self._read(uri, url, response, deadline)
                _discard(response)
                url = urljoin(url, location)
            raise MediaForbidden(f"{uri}: too many redirects (more than {MAX_REDIRECTS})")
        finally:
            _DEADLINE.at = None

    def _get(self, uri: str, url: str, deadline: float) -> urllib3.BaseHTTPResponse:
        where = uri if url == uri else f"{uri} redirects to {url}, and that"
        parts = urlsplit(url)
        self._check_scheme(uri, url, parts.scheme.lower())
        if "@" in parts.netloc:
            raise MediaForbidden(f"{where} has credentials in it (user:pass@host); use a public or presigned URL")
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
            port = parts.port or DEFAULT_PORTS[parts.scheme.lower()]
        except (UnicodeError, ValueError) as exc:
            raise MediaNotFound(f"{where} is not a valid URL ({exc})") from None
        if not host:
            raise MediaNotFound(f"{where} names no host")
        addresses = self._resolve(where, host, port, deadline)
        scheme = parts.scheme.lower()
        # The Host header and the certificate carry the name; the connection goes to the checked address.
        headers = {"Host": (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")}
        tls = {"server_hostname": host, "assert_hostname": host} if scheme == "https" else None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for i, address in enumerate(addresses):
            pool = self.pools.connection_from_host(address, port, scheme, pool_kwargs=tls)
            timeout = self._timeout(where, deadline)
            try:
                return pool.urlopen(
                    "GET",
                    target,
                    headers=headers,
                    timeout=timeout,
                    redirect=False,
                    retries=False,
                    preload_content=False,
                )
            except ConnectTimeoutError as exc:  # refused or timed out; the host's next address may answer
                if i == len(addresses) - 1:
                    raise self._failed(where, deadline, f"{where} could not be reached: {exc}") from None
            except SSLError as exc:
                if isinstance(exc.args[0] if exc.args else None, ssl.SSLCertVerificationError | CertificateError):
                    raise MediaForbidden(f"{where} has a TLS certificate this worker does not trust: {exc}") from None
                raise self._failed(where, deadline, f"{where} failed during the TLS handshake: {exc}") from None
            except HTTPError as exc:
                raise self._failed(where, deadline, f"{where} failed: {exc}") from None
        raise AssertionError("unreachable: _resolve returns at least one address")

    def _check_scheme(self, uri: str, url: str, scheme: str) -> None:
        where = uri if url == uri else f"{uri} redirects to {url}, which"
        if scheme not in DEFAULT_PORTS:
            raise MediaForbidden(f"{where} is not an http(s) URL")
        if not self.settings.allow_http_media:
            raise MediaForbidden(
                f"{scheme} media is not enabled on this worker (VLMQ_ALLOW_HTTP_MEDIA=true turns it on); "
                "or put the object in S3 and send s3://bucket/key"
            )
        if scheme == "http" and not self.settings.allow_plain_http:
            raise MediaForbidden(f"{where} is plain http; use https://, or set VLMQ_ALLOW_PLAIN_HTTP=true")

    def _resolve(self, where: str, host: str, port: int, deadline: float) -> list[str]:
        lookup = self.lookups.submit(self.resolve, host, port, type=socket.SOCK_STREAM)
        try:
            infos = lookup.result(timeout=self._time_left(where, deadline))
        except LookupTimeout:
            lookup.cancel()  # when still waiting for a thread; one already asking the resolver ends by itself
            raise MediaUnavailable(
                f"{where}: its host name {host} did not resolve within {self.settings.http_deadline_s:g} s, the "
                "limit on one whole download (VLMQ_HTTP_DEADLINE_S): the DNS resolver is slow or not answering; "
                "try again later, or put the object in S3 and send s3://bucket/key"
            ) from None
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise MediaNotFound(f"{where} names a host that does not exist ({host})") from None
            raise MediaUnavailable(f"{where} names a host that could not be resolved now ({host}: {exc})") from None
        addresses = list(dict.fromkeys(str(effective_address(ip_address(str(info[4][0])))) for info in infos))
        for address in addresses:
            if not address_allowed(address, self.networks):
                raise MediaForbidden(
                    f"{where} resolves to {address}, which is not a public address; add its network to "
                    "VLMQ_HTTP_ALLOWED_NETWORKS if this worker may read from it"
                )
        if not addresses:
            raise MediaNotFound(f"{where} names a host with no address ({host})")
        return addresses

    def _time_left(self, where: str, deadline: float) -> float:
        """Seconds until `deadline` (a `time.monotonic()` instant); none left fails the download, retryably."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._failed(where, deadline, "")
        return left

    def _failed(self, where: str, deadline: float, message: str) -> MediaUnavailable:
        """A failure with `message`, unless the deadline has passed: then the timeout was the deadline's doing."""
        if time.monotonic() < deadline:
            return MediaUnavailable(message)
        return MediaUnavailable(
            f"{where} did not finish downloading within {self.settings.http_deadline_s:g} s, the limit on one "
            "whole download (VLMQ_HTTP_DEADLINE_S): the server is slow or stalling. Raise VLMQ_HTTP_DEADLINE_S "
            "if large media from slow servers is expected, or put the object in S3 and send s3://bucket/key"
        )

    def _timeout(self, where: str, deadline: float) -> urllib3.Timeout:
        """VLMQ_HTTP_TIMEOUT_S for the next connect and each read, but never past the deadline."""
        seconds = min(self.settings.http_timeout_s, self._time_left(where, deadline))
        return urllib3.Timeout(connect=seconds, read=seconds)

    def _read(self, uri: str, url: str, response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        where = uri if url == uri else f"{uri} (redirected to {url})"
        try:
            _check_status(where, response.status)
            limit = self.settings.max_media_bytes
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit():
                check_media_bytes(uri, int(declared), self.settings)
            chunks: list[bytes] = []
            size = 0
            sock = getattr(response.connection, "sock", None)
            while size <= limit:  # stops at limit + 1 bytes: a body that never ends is not read to its end
                if sock is not None:  # urllib3 sets the socket's timeout once per request; the deadline moves on
                    sock.settimeout(min(self.settings.http_timeout_s, self._time_left(where, deadline)))
                # read1, not read: read(n) waits for all n bytes, so a trickle would never come back to this check
                chunk = response.read1(min(CHUNK_BYTES, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > limit:
                raise MediaTooLarge(f"{uri} is more than {limit:,} bytes, the limit (VLMQ_MAX_MEDIA_BYTES)")
        except HTTPError as exc:
            _discard(response)
            raise self._failed(where, deadline, f"{where} failed while sending its body: {exc}") from None
        except BaseException:
            _discard(response)
            raise
        response.release_conn()  # read to the end: the connection can serve the next request
        return b"".join(chunks)


def _check_status(where: str, status: int) -> None:
    if 200 <= status < 300:
        return
    if status in (404, 410):
        raise MediaNotFound(f"{where} returned HTTP {status}: there is nothing at this URL; check it")
    if status in (401, 403):
        raise MediaForbidden(
            f"{where} returned HTTP {status}: the worker sends no credentials, so use a public or presigned URL"
        )
    if status in (408, 429) or status >= 500:
        raise MediaUnavailable(f"{where} returned HTTP {status}; the server is busy or failing, try again later")
    raise MediaNotFound(f"{where} returned HTTP {status}, not the file; check that it is a direct download link")


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close an unread response: draining it could mean reading gigabytes; the pool reconnects next time."""
    response.close()
    response.release_conn()
