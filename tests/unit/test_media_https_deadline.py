"""The http(s) download deadline (VLMQ_HTTP_DEADLINE_S) also covers what comes before the body: a server that trickles
its status line and headers (each byte well inside the read timeout), and a DNS resolver that does not answer.
Against a real local server on 127.0.0.2 (allowed by the settings); the resolver is injected through the fetcher's
`resolve` seam, as a slow DNS server cannot be had here."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from worker.errors import MediaError
from worker.media.https import HttpFetcher
from worker.settings import WorkerSettings

ALLOWED = "127.0.0.2"
TRICKLE_S = 0.1
HEADER_BYTES = 100  # 10 s of headers, one byte every TRICKLE_S
BODY = b"the whole body"


class Handler(socketserver.StreamRequestHandler):
    """`/ok` answers at once; `/slow-headers` sends its status line and headers a byte every TRICKLE_S."""

    def handle(self) -> None:
        with self.request:
            request = self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * HEADER_BYTES + b"\r\n"
            tail = b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY)
            try:
                if b" /slow-headers " in request:
                    for byte in head:
                        self.wfile.write(bytes([byte]))
                        time.sleep(TRICKLE_S)
                else:
                    self.wfile.write(head)
                self.wfile.write(tail)
            except OSError:  # the client hung up: what the deadline test wants
                pass


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = Server((ALLOWED, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{ALLOWED}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def fetcher(**kwargs: Any) -> HttpFetcher:
    settings = WorkerSettings(
        allow_http_media=True,
        allow_plain_http=True,
        http_allowed_networks=[f"{ALLOWED}/32"],
        http_timeout_s=10.0,
        http_deadline_s=1.0,
    )
    return HttpFetcher(settings, **kwargs)


@pytest.mark.timeout(60)
def test_headers_trickled_a_byte_at_a_time_fail_at_the_deadline_and_the_next_download_works(base: str) -> None:
    fetch = fetcher()
    started = time.monotonic()
    with pytest.raises(MediaError) as info:
        fetch.fetch(f"{base}/slow-headers")
    took = time.monotonic() - started

    assert (info.value.code, info.value.retryable) == ("media_unavailable", True)
    assert info.value.message.startswith(f"{base}/slow-headers did not finish downloading within 1 s, the limit")
    assert took < 3  # the deadline, not the 10 s of headers (each byte far inside the 10 s read timeout)
    assert fetch.fetch(f"{base}/ok") == BODY  # the connection it shut down is not reused


@pytest.mark.timeout(60)
def test_a_resolver_that_does_not_answer_fails_at_the_deadline(base: str) -> None:
    answer = threading.Event()
    asked: list[str] = []

    def hanging(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        asked.append(host)
        answer.wait(30)
        return socket.getaddrinfo(host, *args, **kwargs)

    fetch = fetcher(resolve=hanging)
    started = time.monotonic()
    with pytest.raises(MediaError) as info:
        fetch.fetch("http://media.example/cat.jpg")
    took = time.monotonic() - started
    answer.set()

    assert (info.value.code, info.value.retryable) == ("media_unavailable", True)
    assert info.value.message == (
        "http://media.example/cat.jpg: its host name media.example did not resolve within 1 s, the limit on one "
        "whole download (VLMQ_HTTP_DEADLINE_S): the DNS resolver is slow or not answering; try again later, or put "
        "the object in S3 and send s3://bucket/key"
    )
    assert 1 <= took < 3 and asked == ["media.example"]
    assert fetcher(resolve=socket.getaddrinfo).fetch(f"{base}/ok") == BODY
