"""http(s) media: the SSRF guard (addresses, redirects), size limits and status codes, against real local servers.

On Linux all of 127.0.0.0/8 is loopback: the test server listens on 127.0.0.2, which the settings allow
(VLMQ_HTTP_ALLOWED_NETWORKS=127.0.0.2/32), while 127.0.0.1 stays as blocked as any private address.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from worker.errors import MediaError
from worker.media.https import HttpFetcher, address_allowed, is_public
from worker.media.sources import MediaFetcher
from worker.settings import WorkerSettings

BODY = bytes(range(256)) * 400  # 102,400 bytes
LIMIT = 200_000
ALLOWED = "127.0.0.2"
TRICKLE_S, TRICKLE_BYTES = 0.1, 3000  # one byte every 0.1 s: 5 minutes for the whole body


class Handler(BaseHTTPRequestHandler):
    """Routes: /…/cat.jpg, /chunked, /big, /endless, /status/N, /redirect?to=URL, /[slow/]hops/N, /loop, /trickle*."""

    protocol_version = "HTTP/1.1"
    server: MediaServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers["Host"])
        parts = urlsplit(self.path)
        path = parts.path
        if path.endswith("/cat.jpg"):
            self.send(200, BODY)
        elif path == "/chunked":
            self.send_chunked([BODY[i : i + 10_000] for i in range(0, len(BODY), 10_000)])
        elif path == "/big":
            self.send(200, bytes(LIMIT + 1))
        elif path == "/endless":
            self.send_endless()
        elif path.startswith("/status/"):
            self.send(int(path.rsplit("/", 1)[1]), b"no")
        elif path.endswith("/redirect"):
            self.redirect(parse_qs(parts.query)["to"][0])
        elif path.startswith(("/hops/", "/slow/hops/")):
            if path.startswith("/slow/"):  # each hop answers well within the read timeout, all of them together do not
                time.sleep(TRICKLE_S * 4)
            left = int(path.rsplit("/", 1)[1])
            self.redirect(str(left - 1) if left else "/cat.jpg")
        elif path == "/loop":
            self.redirect("/loop")
        elif path.startswith("/trickle"):
            self.send_trickle(chunked=path.endswith("-chunked"))
        else:
            self.send(404, b"unknown route")

    def send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_chunked(self, chunks: Iterator[bytes] | list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def send_endless(self) -> None:
        def forever() -> Iterator[bytes]:
            while True:
                yield bytes(65_536)

        try:
            self.send_chunked(forever())
        except OSError:  # the client hung up: what the test wants
            self.close_connection = True

    def send_trickle(self, chunked: bool) -> None:
        """One byte every TRICKLE_S: each read is far inside the read timeout, the whole body takes minutes."""

        def trickle() -> Iterator[bytes]:
            for byte in BODY[:TRICKLE_BYTES]:
                time.sleep(TRICKLE_S)
                yield bytes([byte])

        try:
            if chunked:
                self.send_chunked(trickle())
                return
            self.send_response(200)
            self.send_header("Content-Length", str(TRICKLE_BYTES))
            self.end_headers()
            self.wfile.writelines(trickle())  # wfile is unbuffered: each byte goes out on its own
        except OSError:  # the client hung up: what the test wants
            self.close_connection = True


class MediaServer(ThreadingHTTPServer):
    daemon_threads = True
    hosts: list[str]


@contextmanager
def serve(host: str, cert: Path | None = None, key: Path | None = None) -> Iterator[tuple[str, list[str]]]:
    """A media server on `host` in a thread; yields its base URL and the Host headers it receives."""
    server = MediaServer((host, 0), Handler)
    server.hosts = []
    scheme = "http"
    if cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://{host}:{server.server_address[1]}", server.hosts
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve(ALLOWED) as (url, _):
        yield url


def settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "allow_http_media": True,
        "allow_plain_http": True,
        "http_allowed_networks": [f"{ALLOWED}/32"],
        "max_media_bytes": LIMIT,
        "http_timeout_s": 10.0,
    }
    return WorkerSettings(**(values | overrides))


def refused(uri: str, fetcher: HttpFetcher | None = None) -> MediaError:
    with pytest.raises(MediaError) as info:
        (fetcher or HttpFetcher(settings())).fetch(uri)
    return info.value


def test_an_allowed_server_returns_the_exact_bytes(base: str) -> None:
    assert HttpFetcher(settings()).fetch(f"{base}/cat.jpg") == BODY


def test_a_chunked_body_under_the_limit_is_read_whole(base: str) -> None:
    assert HttpFetcher(settings()).fetch(f"{base}/chunked") == BODY


def test_media_fetcher_sends_http_uris_to_the_http_fetcher(base: str) -> None:
    assert MediaFetcher(settings(), s3_client=None).fetch(f"{base}/cat.jpg") == BODY


def test_one_fetcher_serves_many_threads_at_once(base: str) -> None:
    fetcher = HttpFetcher(settings())
    uris = [f"{base}/cat.jpg", f"{base}/chunked"] * 16
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(fetcher.fetch, uris)) == [BODY] * len(uris)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_outside_the_allowed_networks_is_refused(base: str, host: str) -> None:
    port = urlsplit(base).port
    exc = refused(f"http://{host}:{port}/cat.jpg")
    assert exc.code == "media_forbidden"
    assert "resolves to 127.0.0.1, which is not a public address" in exc.message
    assert "VLMQ_HTTP_ALLOWED_NETWORKS" in exc.message


def test_a_redirect_to_loopback_is_refused_and_says_it_was_a_redirect(base: str) -> None:
    target = f"http://127.0.0.1:{urlsplit(base).port}/cat.jpg"
    exc = refused(f"{base}/redirect?to={target}")
    assert exc.code == "media_forbidden"
    assert f"redirects to {target}, and that resolves to 127.0.0.1" in exc.message


def test_a_redirect_to_another_scheme_is_refused(base: str) -> None:
    exc = refused(f"{base}/redirect?to=file:///etc/passwd")
    assert exc.code == "media_forbidden"
    assert "redirects to file:///etc/passwd, which is not an http(s) URL" in exc.message


def test_relative_redirects_resolve_against_the_current_url(base: str) -> None:
    fetcher = HttpFetcher(settings())
    assert fetcher.fetch(f"{base}/a/redirect?to=cat.jpg") == BODY  # -> /a/cat.jpg
    assert fetcher.fetch(f"{base}/hops/4") == BODY  # five redirects: the most followed


def test_redirect_loops_and_long_chains_are_refused(base: str) -> None:
    for uri in (f"{base}/loop", f"{base}/hops/5"):
        exc = refused(uri)
        assert exc.code == "media_forbidden"
        assert exc.message == f"{uri}: too many redirects (more than 5)"


def test_a_declared_length_over_the_limit_is_refused(base: str) -> None:
    exc = refused(f"{base}/big")
    assert exc.code == "media_too_large"
    assert exc.message == f"{base}/big is 200,001 bytes, over the limit of 200,000 (VLMQ_MAX_MEDIA_BYTES)"


@pytest.mark.timeout(30)
def test_an_endless_chunked_body_is_cut_off_at_the_limit(base: str) -> None:
    exc = refused(f"{base}/endless")
    assert exc.code == "media_too_large"
    assert exc.message == f"{base}/endless is more than 200,000 bytes, the limit (VLMQ_MAX_MEDIA_BYTES)"


@pytest.mark.parametrize(
    ("status", "code", "retryable", "fragment"),
    [
        (404, "media_not_found", False, "returned HTTP 404: there is nothing at this URL"),
        (410, "media_not_found", False, "returned HTTP 410"),
        (403, "media_forbidden", False, "use a public or presigned URL"),
        (401, "media_forbidden", False, "returned HTTP 401"),
        (400, "media_not_found", False, "check that it is a direct download link"),
        (429, "media_unavailable", True, "try again later"),
        (503, "media_unavailable", True, "returned HTTP 503"),
    ],
)
def test_http_statuses_map_to_error_codes(base: str, status: int, code: str, retryable: bool, fragment: str) -> None:
    exc = refused(f"{base}/status/{status}")
    assert (exc.code, exc.retryable) == (code, retryable)
    assert fragment in exc.message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["/trickle", "/trickle-chunked"])
def test_a_trickling_body_fails_retryably_at_the_download_deadline(base: str, path: str) -> None:
    started = time.monotonic()
    exc = refused(f"{base}{path}", HttpFetcher(settings(http_deadline_s=1.0)))
    assert (exc.code, exc.retryable) == ("media_unavailable", True)
    assert exc.message.startswith(f"{base}{path} did not finish downloading within 1 s")
    assert "Raise VLMQ_HTTP_DEADLINE_S" in exc.message
    assert time.monotonic() - started < 20  # the 10 s read timeout never fires: only the deadline ended it


@pytest.mark.timeout(60)
def test_the_download_deadline_spans_all_redirects(base: str) -> None:
    exc = refused(f"{base}/slow/hops/4", HttpFetcher(settings(http_deadline_s=1.0)))
    assert (exc.code, exc.retryable) == ("media_unavailable", True)
    assert exc.message.startswith(f"{base}/slow/hops/4 redirects to {base}/slow/hops/")
    assert (
        "did not finish downloading within 1 s, the limit on one whole download (VLMQ_HTTP_DEADLINE_S)" in exc.message
    )


def test_a_redirect_to_an_error_names_both_urls(base: str) -> None:
    exc = refused(f"{base}/redirect?to=/status/404")
    assert exc.code == "media_not_found"
    assert exc.message.startswith(f"{base}/redirect?to=/status/404 (redirected to {base}/status/404) returned HTTP 404")


def test_a_closed_port_is_unavailable_and_retryable() -> None:
    with socket.socket() as probe:
        probe.bind((ALLOWED, 0))
        port = probe.getsockname()[1]
    exc = refused(f"http://{ALLOWED}:{port}/cat.jpg")
    assert (exc.code, exc.retryable) == ("media_unavailable", True)
    assert "could not be reached" in exc.message


def test_https_media_needs_allow_http_media(base: str) -> None:
    exc = refused("https://example.com/cat.jpg", HttpFetcher(settings(allow_http_media=False)))
    assert exc.code == "media_forbidden"
    assert "VLMQ_ALLOW_HTTP_MEDIA=true" in exc.message


def test_plain_http_needs_allow_plain_http(base: str) -> None:
    exc = refused(f"{base}/cat.jpg", HttpFetcher(settings(allow_plain_http=False)))
    assert exc.code == "media_forbidden"
    assert "is plain http; use https://, or set VLMQ_ALLOW_PLAIN_HTTP=true" in exc.message


def test_credentials_in_the_url_are_refused(base: str) -> None:
    exc = refused(base.replace("://", "://user:secret@") + "/cat.jpg")
    assert exc.code == "media_forbidden"
    assert "credentials" in exc.message


def test_a_host_that_does_not_exist_is_not_found() -> None:
    exc = refused("https://no-such-host.invalid/cat.jpg")
    assert exc.code == "media_not_found"
    assert "names a host that does not exist" in exc.message


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",  # carrier-grade NAT
        "169.254.169.254",  # cloud metadata
        "127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "fc00::1",
        "fe80::1",
        "ff02::1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public(address)
    assert not address_allowed(address, [])


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public(address)
    assert address_allowed(address, [])


def test_allowed_networks_admit_private_addresses_also_written_as_ipv6() -> None:
    networks = [ip_network("10.0.0.0/8")]
    assert address_allowed("10.1.2.3", networks)
    assert address_allowed("::ffff:10.1.2.3", networks)
    assert not address_allowed("192.168.0.1", networks)


def test_an_invalid_allowed_network_fails_at_start_up() -> None:
    with pytest.raises(ValueError, match="VLMQ_HTTP_ALLOWED_NETWORKS"):
        HttpFetcher(settings(http_allowed_networks=["10.0.0.0/33"]))


# https: a self-signed certificate made with the openssl command, trusted by passing it as the CA bundle.


def make_cert(directory: Path, names: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=vlmq-test"),
            *("-addext", f"subjectAltName={names}"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_connects_to_the_checked_address_and_verifies_the_host_name(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "DNS:localhost")
    loopback = settings(http_allowed_networks=["127.0.0.1/32", "::1/128"])
    with serve("127.0.0.1", cert, key) as (url, hosts):
        port = urlsplit(url).port
        assert HttpFetcher(loopback, ca_certs=str(cert)).fetch(f"https://localhost:{port}/cat.jpg") == BODY
        assert hosts == [f"localhost:{port}"]
        exc = refused(f"https://localhost:{port}/cat.jpg", HttpFetcher(loopback))  # not in the default CA bundle
        assert exc.code == "media_forbidden"
        assert "TLS certificate this worker does not trust" in exc.message


def test_https_refuses_a_certificate_for_another_name(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "DNS:other.example")
    with serve(ALLOWED, cert, key) as (url, _):
        exc = refused(f"{url}/cat.jpg", HttpFetcher(settings(), ca_certs=str(cert)))
        assert exc.code == "media_forbidden"
        assert "TLS certificate this worker does not trust" in exc.message
