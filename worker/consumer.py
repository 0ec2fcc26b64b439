"""The worker's Celery consumer: every message passes the gate (worker/gate.py) before Celery's request machinery.

Whatever a message holds, it ends in one outcome: a job Celery runs, a failed result under its task id, or a dead
letter; the consumer never exits, loops or holds a slot because of it. A message that still kills the process (a
native crash) is counted on each redelivery and dead-lettered after VLMQ_MAX_CRASHES, so it cannot take a fleet
down one worker after another.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from botocore.exceptions import BotoCoreError, ClientError
from celery.worker.consumer import Consumer
from celery.worker.state import active_requests
from kombu.message import Message
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual.base import Message as KombuMessage
from kombu.utils.json import loads as _kombu_loads

from producer.core.ledger import Ledger
from worker import gate
from worker.errors import InvalidJob, WorkerLost
from worker.gate import Admitted, Deadlines, Refused
from worker.hooks import Hooks
from worker.visibility import HeldMessages

log = logging.getLogger(__name__)

KEPT_CHARS = 4096  # of a dead message's headers and body
Record = Callable[[Refused, dict[str, Any]], None]


class Intake:
    """What the worker does with each message its consumer receives."""

    def __init__(
        self,
        ledger: Ledger,
        record: Record,
        *,
        max_bytes: int,
        max_crashes: int,
        max_eta_s: float | None = None,
        hooks: Hooks | None = None,
        deadlines: Deadlines | None = None,
        progressed: Callable[[], None] = lambda: None,
    ) -> None:
        self.ledger = ledger
        self.record = record  # stores a refusal: a failed result under its id, or a dead letter
        self.max_bytes = max_bytes
        self.max_crashes = max_crashes
        self.max_eta_s = max_eta_s  # the broker's visibility timeout: an eta further ahead is refused
        self.hooks = hooks or Hooks()
        self.deadlines = deadlines or Deadlines()
        self.progressed = progressed  # a message ended here: the consumer is moving (liveness)
        self.busy_since: float | None = None  # monotonic time the message being read arrived (liveness)

    def receive(self, message: Message, celery: Callable[[Message], None]) -> None:
        """Admit the message to Celery (`celery`, its own handler), or end it here."""
        self.busy_since = time.monotonic()
        try:
            verdict = gate.inspect(message, self.max_bytes, max_eta_s=self.max_eta_s)
            if isinstance(verdict, Admitted):
                verdict = self._crash_loop(message, verdict)
            if isinstance(verdict, Refused):
                self.refuse(message, verdict)
                return
            self.hooks.message(message.body if isinstance(message.body, bytes) else b"")
            if "submitted_at" not in verdict.job:
                verdict.stamp(self.ledger.first_seen(verdict.task_id, datetime.now(UTC)).isoformat())
            if verdict.expires is not None:
                self.deadlines.put(verdict.task_id, verdict.expires)
            gate.admit(message, verdict)
            celery(message)
        except Exception as exc:  # anything Celery or kombu raise for this message: it must not reach the loop
            log.exception("could not take a message")
            why = f"the worker could not take the message: {type(exc).__name__}: {exc}"
            self.refuse(message, _refusal(message, why))
        finally:
            self.busy_since = None

    def _crash_loop(self, message: Message, admitted: Admitted) -> Admitted | Refused:
        """A message redelivered VLMQ_MAX_CRASHES times without its job starting killed the workers that took it."""
        if not (message.delivery_info or {}).get("redelivered"):
            return admitted
        receipts = self.ledger.record_received_again(admitted.task_id)
        if receipts < self.max_crashes:
            return admitted
        error = WorkerLost(
            f"workers died {receipts} times receiving this message, before its job could start, so it was not taken "
            "again. Check what its producer sent, then `vlmq retry-failed`"
        )
        return Refused(admitted.task_id, error, admitted.job, attempts=receipts + 1)

    def undecodable(self, message: Message, exc: BaseException) -> None:
        """A message kombu could not decode (its `compression` does not fit its body)."""
        self.refuse(message, gate.undecodable(message, exc))

    def refuse(self, message: Message, refusal: Refused) -> None:
        """Record the refusal and acknowledge the message; never raises (the consumer loop must not see it).

        When Redis or S3 cannot be reached the message goes back to its queue instead, to be refused again later.
        """
        requeue = False
        try:
            self.record(refusal, kept_copy(message))
        except (redis.RedisError, BotoCoreError, ClientError) as exc:
            log.error("could not record the refusal of message %s (%s); back to its queue", refusal.task_id, exc)
            requeue = True
        except Exception:
            log.exception("could not record the refusal of message %s", refusal.task_id)
        try:
            if message.acknowledged:
                pass
            elif requeue:
                message.reject(requeue=True)
            else:
                message.ack()
        except Exception:
            log.exception("could not settle refused message %s", refusal.task_id)
        self.progressed()


def kept_copy(message: Message) -> dict[str, Any]:
    """A bounded, JSON-safe copy of a message, for the dead letters."""
    body = message.body if isinstance(message.body, bytes) else str(message.body or "").encode()
    try:
        headers = json.dumps(message.headers, default=repr)
    except (TypeError, ValueError):
        headers = repr(message.headers)
    return {
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "routing_key": (message.delivery_info or {}).get("routing_key"),
        "headers": headers[:KEPT_CHARS],
        "body": body[:KEPT_CHARS].decode("utf-8", errors="replace"),
        "body_bytes": len(body),
    }


class TolerantMessage(KombuMessage):
    """kombu's Redis message, standing in for an envelope kombu cannot handle (an item that is not JSON, headers or
    properties that are not objects, no delivery_info, a body that is not base64), as a client writing kombu's
    Redis layout by hand may send. kombu would raise inside its delivery: the worker would stop, or take it for a
    lost connection and put back every message it held, running ones included. Such a message becomes one the gate
    refuses (no usable id: a dead letter with a copy of the envelope). A `compression` header is taken out before
    kombu inflates the body in full, past any limit; the gate refuses the message under its id."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        raw = payload
        problem = envelope_problem(payload)
        if problem is None:
            headers = dict(payload.get("headers") or {})
            if headers.get("compression"):
                headers[gate.COMPRESSED] = str(headers.pop("compression"))[:100]
            try:
                super().__init__({**payload, "headers": headers}, channel=channel, **kwargs)
                self._raw = raw  # what kombu records as unacknowledged, and restores
                return
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
        properties = payload.get("properties") if isinstance(payload, dict) else None
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        stand_in = {
            "body": json.dumps(payload, default=repr)[: 4 * KEPT_CHARS],
            "content-type": gate.JSON,
            "headers": {gate.UNREADABLE: problem},
            "properties": {
                "delivery_tag": tag if isinstance(tag, str | int) else str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": ""},
            },
        }
        super().__init__(stand_in, channel=channel, **kwargs)

    def ack(self, multiple: bool = False) -> None:
        """kombu's ack, except on a channel whose connection was lost meanwhile: a task that ended while the
        consumer reconnected is acknowledged on the old channel, whose client kombu has dropped ("'NoneType' object
        has no attribute 'hostname'", the same kombu 5.7 race as in `VlmqConsumer`). Celery would call that
        unrecoverable and stop the worker with status 0, its held jobs unrun. The message, kept held when the
        connection was lost (`hold_running`), is acknowledged through the worker's own Redis client instead; failing
        that, it comes back after the visibility timeout and its copy returns the stored result."""
        try:
            super().ack(multiple=multiple)
        except AttributeError as lost:
            transport = getattr(self.channel, "connection", None)
            if transport is not None and transport.client is not None:
                raise
            reason: Exception = lost
            try:
                done = HELD.acknowledge(str(self.delivery_tag))
            except redis.RedisError as exc:
                done, reason = False, exc
            if not done:
                log.warning("could not acknowledge message %s on its lost connection (%s)", self.delivery_tag, reason)
            self._state = "ACK"  # done with on this side; a second ack would raise kombu's MessageStateError


def _tolerant_loads(text: Any, *args: Any, **kwargs: Any) -> Any:
    """kombu's JSON `loads` for its Redis transport, but an item that is not JSON becomes an envelope
    `TolerantMessage` stands in for (kombu would raise, and the worker stop with the item popped and lost)."""
    try:
        return _kombu_loads(text, *args, **kwargs)
    except Exception as exc:
        return {"x-vlmq-raw": str(text)[: 4 * KEPT_CHARS], "x-vlmq-error": f"{type(exc).__name__}: {exc}"}


def envelope_problem(payload: Any) -> str | None:
    """What in a kombu Redis envelope kombu's own code would fail on after building the message (None: nothing)."""
    if not isinstance(payload, dict):
        return f"the envelope is {type(payload).__name__}, not an object"
    if "x-vlmq-error" in payload:
        return f"the item is not JSON ({payload['x-vlmq-error']})"
    headers, properties = payload.get("headers"), payload.get("properties")
    if headers is not None and not isinstance(headers, dict):
        return f"its headers are {type(headers).__name__}, not an object"
    if not isinstance(properties, dict):
        return f"its properties are {type(properties).__name__}, not an object"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not {"exchange", "routing_key"} <= info.keys():
        return "its properties.delivery_info lacks exchange and routing_key"
    if not isinstance(properties.get("delivery_tag"), str | int):
        return "its properties.delivery_tag is missing"
    return None


def routed_home(payload: Any, queue: str) -> Any:
    """A Redis envelope popped from `queue`, with a route that leads back there: kombu restores an unacknowledged
    message (a worker died or lost its connection while holding it), and Celery sends a retry, along the envelope's
    `delivery_info` exchange and routing key. Clients that write kombu's Redis layout by hand name other routes
    (gocelery: exchange and routing key `celery`, whatever list it pushed to), which kombu's restore sent to its
    dead-letter queue `ae.undeliver`; and they leave `headers` out (the restored copy was not marked redelivered,
    so a crash loop went uncounted) or null (kombu's restore failed on it and dropped the message)."""
    if not isinstance(payload, dict) or envelope_problem(payload) is not None:
        return payload  # `TolerantMessage` dead-letters it: acknowledged at once, never restored
    if payload.get("headers") is None:
        payload["headers"] = {}
    info = payload["properties"]["delivery_info"]
    if (info["exchange"], info["routing_key"]) != ("", queue):  # vlmq's own messages already name their queue so
        payload["properties"]["delivery_info"] = {**info, "exchange": "", "routing_key": queue}
    return payload


HELD = HeldMessages()  # the messages this process's channels hold (kombu creates the channels)


class VlmqChannel(kombu_redis.Channel):
    """kombu's Redis channel in a worker process: it reads items with `_tolerant_loads` into `TolerantMessage`s,
    and every message it delivers from a queue names that queue as its route (`routed_home`)."""

    Message = TolerantMessage

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        HELD.track(self)  # the visibility heartbeat re-arms what it holds

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        consumed = super().basic_consume(queue, *args, **kwargs)
        callbacks: dict[str, Callable[[Any], Any]] = self.connection._callbacks  # type: ignore[assignment]
        if queue not in self._fanout_queues:  # type: ignore[attr-defined]  # broadcasts (pidbox) are never restored
            deliver = callbacks[queue]
            callbacks[queue] = lambda payload: deliver(routed_home(payload, queue))
        return consumed


def tolerate_foreign_envelopes() -> None:
    """Make kombu's Redis transport use `VlmqChannel` and `_tolerant_loads` (this worker process only)."""
    kombu_redis.loads = _tolerant_loads  # type: ignore[attr-defined]
    kombu_redis.Transport.Channel = VlmqChannel


class VlmqConsumer(Consumer):
    """Celery's consumer with the gate in front of its task handler, and a broken broker connection that fails to
    close not stopping the worker. The worker makes a subclass holding its `Intake` at start-up (`with_intake`):
    Celery builds the consumer from the class it is given."""

    intake: Intake

    @classmethod
    def with_intake(cls, intake: Intake) -> type[VlmqConsumer]:
        return type(cls.__name__, (cls,), {"intake": intake})

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], None]:
        celery = super().create_task_handler(*args, **kwargs)
        return lambda message: self.intake.receive(message, celery)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        hold_running(self.connection)
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            # kombu 5.7 race, seen once in ~15 Redis restarts: closing the lost channel restores its unacked
            # messages through a client it has already dropped ("'NoneType' object has no attribute
            # 'hostname'"). Celery would call that unrecoverable and stop the worker with status 0. The
            # messages stay in the unacknowledged hash and come back after the visibility timeout.
            log.warning("closing the lost broker connection failed (%s); reconnecting anyway", error)

    # Past the gate these should not happen; if Celery still finds fault with a message, it ends as a refusal
    # (one result) rather than Celery's log-and-drop.
    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self.intake.undecodable(message, exc)

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        self.intake.refuse(message, _refusal(message, f"Celery refused the message: {exc}"))

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self.intake.refuse(message, _refusal(message, "Celery could not read the message as a task"))

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        self.intake.refuse(message, _refusal(message, f"unknown task: {exc}"))


def hold_running(connection: Any) -> None:
    """Before Celery closes a lost broker connection: kombu would put back in their queues every message the worker
    holds, those of running jobs too, and each would then run a second time beside the first (Celery warns of it;
    cancelling running tasks is not possible in the threads pool). A running job's message stays held instead: the
    heartbeat re-arms it and its task acknowledges it when it ends (`TolerantMessage.ack`). The others, which Celery
    forgets on reconnecting (a retry waiting for its delay), stay unacknowledged and come back after the visibility
    timeout."""
    running = {str(request.message.delivery_tag) for request in tuple(active_requests)}
    for channel in tuple(getattr(getattr(connection, "transport", None), "channels", ())):
        channel.do_restore = False
        qos = getattr(channel, "_qos", None)
        if qos is not None:
            for tag in [t for t in list(qos._delivered) if str(t) not in running]:
                qos._delivered.pop(tag, None)


def _refusal(message: Message, why: str) -> Refused:
    headers = message.headers if isinstance(message.headers, dict) else {}
    return Refused(gate.usable_id(headers.get("id")), InvalidJob(why))
