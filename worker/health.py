"""The worker's HTTP endpoint on VLMQ_METRICS_PORT: `/metrics` for Prometheus, `/livez` and `/readyz` for probes.

- `/readyz` answers 200 once the model is loaded and the consumer runs, 503 before and during shutdown.
- `/livez` answers 503 when the model loop is stuck (a batch running longer than VLMQ_LIVENESS_STALL_S), when the
  consumer is stuck (messages wait in the worker's queues or are held by it, and no job has started or ended for
  VLMQ_LIVENESS_STALL_S), or the device is broken: a one-token forward pass through the loaded model (at most
  every 10 s) must succeed within `PROBE_TIMEOUT_S`. While the model loads it answers 200: a long load is not a
  dead process.

The server starts before the model loads, so a probe can tell "loading" from "down".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.metrics import Metrics
from worker.watchdog import DeadlinePassed, call_with_deadline

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
PROBE_EVERY_S = 10.0


class Health:
    """Liveness and readiness of one worker process."""

    def __init__(self, metrics: Metrics, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.stall_s = stall_s
        self.clock = clock
        self.probe: Callable[[], None] | None = None  # set once the model is loaded
        self.batch_age: Callable[[], float | None] = lambda: None
        self.waiting: Callable[[], int] | None = None  # messages queued for or held by this worker; set once consuming
        self.reading_since: Callable[[], float | None] = lambda: None  # since when the consumer reads one message
        self._progress = clock()
        self._last: tuple[float, bool, str] | None = None
        self._lock = threading.Lock()

    def ready(self) -> tuple[bool, str]:
        if self.metrics.registry.get_sample_value("vlmq_ready") == 1:
            return True, "ready"
        return False, "loading the model" if self.probe is None else "not consuming jobs"

    def progressed(self) -> None:
        """A job started or ended: the consumer is moving."""
        self._progress = self.clock()

    def alive(self) -> tuple[bool, str]:
        age = self.batch_age()
        if age is not None and age > self.stall_s:
            return False, f"a batch has run for {age:.0f} s, over VLMQ_LIVENESS_STALL_S={self.stall_s:g}"
        if age is not None:  # a batch is running and not stalled: that says more than a probe beside it would
            return True, "alive (running a batch)"
        stuck = self._consumer_stuck()
        if stuck:
            return False, stuck
        if self.probe is None:
            return True, "loading the model"
        with self._lock:  # one probe at a time; answers within PROBE_EVERY_S reuse the last one
            if self._last is None or self.clock() - self._last[0] >= PROBE_EVERY_S:
                self._last = (self.clock(), *self._run_probe(self.probe))
            return self._last[1], self._last[2]

    def _consumer_stuck(self) -> str | None:
        reading = self.reading_since()
        if reading is not None and self.clock() - reading > self.stall_s:
            return (
                f"the consumer has been reading one message for {self.clock() - reading:.0f} s, over "
                f"VLMQ_LIVENESS_STALL_S={self.stall_s:g}: it is stuck"
            )
        idle = self.clock() - self._progress
        if self.waiting is None or idle <= self.stall_s:
            return None
        try:
            waiting = self.waiting()
        except Exception as exc:  # Redis down: a restart would not help, and the consumer reconnects by itself
            log.warning("liveness: could not count waiting messages (%s)", exc)
            return None
        if not waiting:
            return None
        return (
            f"{waiting} messages wait but no job has started or ended for {idle:.0f} s, over "
            f"VLMQ_LIVENESS_STALL_S={self.stall_s:g}: the consumer is stuck"
        )

    def _run_probe(self, probe: Callable[[], None]) -> tuple[bool, str]:
        try:
            call_with_deadline(probe, PROBE_TIMEOUT_S, "vlmq-probe")
        except DeadlinePassed:
            return False, f"a one-token forward pass did not finish within {PROBE_TIMEOUT_S:g} s"
        except Exception as exc:
            log.error("liveness probe failed: %s: %s", type(exc).__name__, exc)
            return False, f"a one-token forward pass failed: {type(exc).__name__}: {exc}"
        return True, "alive"

    def serve(self, port: int, addr: str = "0.0.0.0") -> ThreadingHTTPServer:  # scraped from outside the pod
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(health.metrics.registry), CONTENT_TYPE_LATEST)
                elif path in ("/livez", "/readyz"):
                    ok, reason = health.alive() if path == "/livez" else health.ready()
                    self._send(200 if ok else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"try /metrics, /livez or /readyz\n", "text/plain; charset=utf-8")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: not worth a line
                pass

        server = ThreadingHTTPServer((addr, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="vlmq-http", daemon=True).start()
        return server
