"""A worker's background chores: a daemon thread that does one piece of work every so many seconds until stopped
(the lost-message sweep, the model announcement, the visibility heartbeat)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)


class Periodic:
    """Calls `work` every `every_s` seconds (`at_once`: the first time right away) in a thread named `name`, until
    stopped. A Redis error (an outage) is logged as a warning, any other error with its traceback; either way the
    next call comes at its time. `doing` says what the work is, for those log lines ("look for lost jobs")."""

    def __init__(
        self, name: str, every_s: float, work: Callable[[], object], doing: str, *, at_once: bool = False
    ) -> None:
        self.every_s, self.work, self.doing, self.at_once = every_s, work, doing, at_once
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        if self.at_once:
            self._once()
        while not self._stopped.wait(self.every_s):
            self._once()

    def _once(self) -> None:
        try:
            self.work()
        except redis.RedisError as exc:
            log.warning("could not %s (%s); trying again in %.0f s", self.doing, exc, self.every_s)
        except Exception:
            log.exception("could not %s; trying again in %.0f s", self.doing, self.every_s)
