"""The message gate: every message on a vlmq queue is read here, as data, before Celery's request machinery sees it.

Celery trusts a task message's shape. A body that was not `[args, kwargs, embed]` raised inside its consumer and
stopped the worker, restoring the message at the head of the queue so that every restarted worker died on it; a
message without an `id` header made kombu reconnect in a loop; an embed that was not an object held a task slot for
ever. The gate decides instead, for any bytes and headers:

- `Admitted`: a `vlmq.run` call carrying one job, handed on to Celery in the shape it expects. Shapes other
  clients send are normalised: kwargs or embed `null` (celery-node), the job as the keyword argument `job`.
- `Refused` with a task id: the message ends as a failed `JobResult` under that id (`invalid_job`, naming what
  arrived and what was expected). A Celery `expires` is taken out of Celery's hands (it would only revoke the job,
  with no result) and handed to the task, which ends the job `expired` if it is due (worker.lifecycle.decide).
- `Refused` without one: nothing can carry a result, so the message goes to the dead letters.

Nothing from a message is ever executed: only JSON is decoded, and only after its content type says JSON.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from producer.core.jobs import TASK_NAME
from worker.errors import InvalidJob, VlmqError

MAX_ID_CHARS = 256
JSON = "application/json"
UNREADABLE = "x-vlmq-unreadable-envelope"  # set by worker.consumer.TolerantMessage
COMPRESSED = "x-vlmq-compressed"  # ditto, in place of kombu's `compression` (kombu would inflate it unbounded)
_TEXT_HEADERS = ("root_id", "parent_id", "group", "argsrepr", "kwargsrepr", "origin", "lang")
SEND_HINT = "Send jobs with producer.Client, `vlmq submit`, or any Celery client as send_task('vlmq.run', args=[job])"
_KWARGS = frozenset({"force"})


@dataclass
class Admitted:
    """A `vlmq.run` call with one job, as Celery should see it: protocol 2, headers from an allow-list, the body
    `[[job], kwargs, {}]` (no canvas: Celery's links, chains and chords are not followed)."""

    task_id: str
    headers: dict[str, Any]
    body: list[Any]
    job: dict[str, Any]  # the job object inside `body`
    changed: bool  # `body` differs from the message's: hand Celery the new one
    expires: datetime | None = None  # Celery's `expires`, taken out of Celery's hands (it would only revoke)

    def stamp(self, submitted_at: str) -> None:
        """Give a job that came without `submitted_at` the time a worker first saw it, so TTLs still hold."""
        self.job["submitted_at"] = submitted_at
        self.changed = True


@dataclass(frozen=True)
class Refused:
    """A message that ends here: as a failed result under `task_id`, or (no usable id) in the dead letters."""

    task_id: str | None
    error: VlmqError
    job: dict[str, Any] | None = field(default=None)  # the job, where the message carried one
    attempts: int = 1


def inspect(
    message: Any, max_bytes: int, now: datetime | None = None, max_eta_s: float | None = None
) -> Admitted | Refused:
    """The gate's verdict on a kombu message (read only: `admit` applies an `Admitted` to it).

    `max_eta_s`: how far ahead an `eta` may be (the broker's visibility timeout; None: any).
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return Refused(None, InvalidJob(f"the message headers are {type(headers).__name__}, not an object"))
    if UNREADABLE in headers:
        return Refused(None, InvalidJob(f"kombu could not read the message's envelope ({headers[UNREADABLE]})"))
    task_id = usable_id(headers.get("id"))
    if COMPRESSED in headers:
        return Refused(
            task_id,
            InvalidJob(
                f"compressed message bodies ({headers[COMPRESSED]}) are not accepted: a compressed body can expand "
                "past any limit before it is read. Send the job as plain JSON"
            ),
        )
    if message.content_type != JSON:
        what = message.content_type or "no content type"
        return Refused(task_id, InvalidJob(f"the message is {what}; vlmq workers accept only {JSON}. {SEND_HINT}"))
    raw = message.body if isinstance(message.body, bytes) else str(message.body or "").encode()
    if len(raw) > max_bytes:
        return Refused(
            task_id,
            InvalidJob(
                f"the message body is {len(raw):,} bytes, over VLMQ_MAX_MESSAGE_BYTES={max_bytes:,}; a job refers to "
                "its media by URI, it does not carry them"
            ),
        )
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        return Refused(task_id, InvalidJob(f"the message body is not UTF-8 JSON ({exc}). {SEND_HINT}"))
    typed = _typed_object(body)
    if typed is not None:
        return Refused(
            task_id,
            InvalidJob(
                f"the body holds a kombu-typed object ({{'__type__': ...}}) at {typed}; a job is plain JSON. "
                f"{SEND_HINT}"
            ),
        )
    when = _When(now or datetime.now(UTC), max_eta_s)
    if "task" in headers:
        return _check_v2(headers, body, task_id, when)
    return _check_v1(headers, body, when)


def undecodable(message: Any, exc: BaseException) -> Refused:
    """The verdict on a message kombu could not even decode (e.g. a `compression` header its body does not fit)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    compression = headers.get("compression")
    what = f"could not be decompressed ({compression})" if compression else "could not be decoded"
    return Refused(
        usable_id(headers.get("id")), InvalidJob(f"the message body {what}: {type(exc).__name__}: {exc}. {SEND_HINT}")
    )


def usable_id(value: Any) -> str | None:
    """A task id a result can be stored under: a non-empty printable string of at most MAX_ID_CHARS."""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and value.isprintable():
        return value
    return None


def _check_v2(headers: dict[str, Any], body: Any, task_id: str | None, when: _When) -> Admitted | Refused:
    if task_id is None:
        return _no_id(headers.get("id"))
    name = headers["task"]
    if name != TASK_NAME:
        return Refused(task_id, _unknown_task(name))
    if not isinstance(body, list) or len(body) != 3:
        got = f"a list of {len(body)} items" if isinstance(body, list) else _kind(body)
        return Refused(
            task_id,
            InvalidJob(
                f"a Celery protocol 2 message body must be [args, kwargs, embed]; this one is {got}. {SEND_HINT}"
            ),
        )
    args, kwargs, embed = body
    if embed is not None and not isinstance(embed, dict):
        return Refused(task_id, InvalidJob(f"the body's embed (its third item) must be an object, not {_kind(embed)}"))
    try:
        job, call_kwargs = _call(args, kwargs)
        expires = _times(headers, when)
    except VlmqError as exc:
        return Refused(task_id, exc, _job_of(args, kwargs), _attempts(headers))
    canvas = any((embed or {}).values())  # Celery's own producer sends the canvas keys with null values
    normal = [[job], call_kwargs, {} if canvas else embed or {}]
    return Admitted(task_id, _allowed(headers, task_id), normal, job, normal != body, expires)


def _check_v1(headers: dict[str, Any], body: Any, when: _When) -> Admitted | Refused:
    if not isinstance(body, dict):
        return Refused(
            usable_id(headers.get("id")),
            InvalidJob(
                "the message has no `task` header (Celery protocol 2) and its body is "
                f"{_kind(body)}, not a protocol 1 task object. {SEND_HINT}"
            ),
        )
    task_id = usable_id(body.get("id"))
    if task_id is None:
        return _no_id(body.get("id"))
    if body.get("task") != TASK_NAME:
        return Refused(task_id, _unknown_task(body.get("task")))
    try:
        job, call_kwargs = _call(body.get("args", []), body.get("kwargs", {}))
        expires = _times(body, when)
    except VlmqError as exc:
        return Refused(task_id, exc, _job_of(body.get("args"), body.get("kwargs")), _attempts(body))
    return Admitted(task_id, _allowed(body, task_id), [[job], call_kwargs, {}], job, True, expires)


def _allowed(fields: dict[str, Any], task_id: str) -> dict[str, Any]:
    """The protocol 2 headers Celery gets: the ones vlmq knows, of the types Celery expects. Others (a bad
    `timelimit`, `ignore_result`, `shadow`, stamps) raised in Celery after the message was reserved, or changed
    where its result went."""
    headers: dict[str, Any] = {"task": TASK_NAME, "id": task_id, "retries": fields.get("retries") or 0}
    eta = _instant(fields.get("eta"))
    if eta is not None:
        headers["eta"] = eta.isoformat()
    for name in _TEXT_HEADERS:
        if isinstance(fields.get(name), str):
            headers[name] = fields[name]
    return headers


def _typed_object(value: Any, path: str = "body") -> str | None:
    """Where `value` holds an object kombu's JSON decoder turns into a Python type (Celery decodes with it)."""
    if isinstance(value, dict):
        if "__type__" in value:
            return path
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _typed_object(item, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def _call(args: Any, kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job and the keyword arguments of a `vlmq.run(job, force=False)` call, from whatever shape arrived."""
    if kwargs is None:  # celery-node sends null for "no keyword arguments"
        kwargs = {}
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise InvalidJob(
            f"vlmq.run takes args as a list and kwargs as an object; got args {_kind(args)} and kwargs "
            f"{_kind(kwargs)}. {SEND_HINT}"
        )
    kwargs = dict(kwargs)
    if "job" in kwargs and not args:
        args = [kwargs.pop("job")]
    unknown = sorted(set(kwargs) - _KWARGS)
    if len(args) != 1 or unknown:
        extra = f" and unknown keyword arguments {unknown}" if unknown else ""
        raise InvalidJob(
            f"vlmq.run takes one argument, the job object (args=[job]), and optionally force=true; got "
            f"{len(args)} positional arguments{extra}. {SEND_HINT}"
        )
    if not isinstance(args[0], dict):
        raise InvalidJob(f"a job must be a JSON object, got {_kind(args[0])}")
    if not isinstance(kwargs.get("force", False), bool):
        raise InvalidJob(f"force must be true or false, not {_kind(kwargs['force'])}")
    return args[0], kwargs


@dataclass(frozen=True)
class _When:
    now: datetime
    max_eta_s: float | None  # the broker's visibility timeout


def _times(headers: dict[str, Any], when: _When) -> datetime | None:
    """Checks `eta`, `retries` and `expires` as Celery would read them; returns the expiry. Raises `InvalidJob` for
    one that cannot be read, or an `eta` further ahead than the visibility timeout."""
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is not None and _instant(value) is None:
            raise InvalidJob(f"the message's {name} {value!r} is not an ISO 8601 time or a Unix timestamp")
    retries = headers.get("retries")
    if retries is not None and _count(retries) is None:
        raise InvalidJob(f"the message's retries {retries!r} is not a count")
    expires = _instant(headers.get("expires"))  # decided on when the job starts (worker.lifecycle.decide)
    eta = _instant(headers.get("eta"))
    if eta is not None and when.max_eta_s is not None and (eta - when.now).total_seconds() > when.max_eta_s:
        # A worker holds a message unacknowledged until its eta; Redis delivers one unacknowledged past the
        # visibility timeout again, to a second worker, and each new copy would count as a crash.
        raise InvalidJob(
            f"the message's eta ({eta.isoformat()}) is {(eta - when.now).total_seconds():,.0f} s ahead, more than "
            f"the broker's visibility timeout (VLMQ_VISIBILITY_TIMEOUT_S={when.max_eta_s:g}): Redis would deliver "
            "it again while a worker holds it waiting. Send it at most that far ahead of its time (keep later jobs "
            "on your side until then), or raise VLMQ_VISIBILITY_TIMEOUT_S on workers and producers alike"
        )
    return expires


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _attempts(fields: dict[str, Any]) -> int:
    """The attempt a refused message was: its Celery retries + 1 (a refused retry was at least the second)."""
    return (_count(fields.get("retries")) or 0) + 1


def _instant(value: Any) -> datetime | None:
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # Celery sends UTC times
    except (ValueError, OverflowError, OSError):
        pass
    return None


def _job_of(args: Any, kwargs: Any) -> dict[str, Any] | None:
    if isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict):
        return args[0]
    job = kwargs.get("job") if isinstance(kwargs, dict) else None
    return job if isinstance(job, dict) else None


def _no_id(value: Any) -> Refused:
    got = "none" if value is None else f"{_kind(value)} {str(value)[:40]!r}"
    return Refused(None, InvalidJob(f"the message has no usable task id (got {got}); nothing can hold its result"))


def _unknown_task(name: Any) -> InvalidJob:
    return InvalidJob(f"unknown task {name!r}: vlmq workers run only {TASK_NAME!r}. {SEND_HINT}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def admit(message: Any, admitted: Admitted) -> None:
    """Hand Celery the admitted shape: the allowed headers (no `expires`: vlmq ends expired jobs itself) and the
    normalised body."""
    message.headers = admitted.headers
    if admitted.changed:
        message.body = json.dumps(admitted.body).encode()
        message._decoded_cache = None  # kombu caches the decoded body; Celery must decode the new one


class Deadlines:
    """Expiry times the gate took from messages, until their task starts (one process: the threads pool)."""

    def __init__(self, most: int = 100_000) -> None:
        self._at: OrderedDict[str, datetime] = OrderedDict()
        self._lock = threading.Lock()
        self._most = most

    def put(self, task_id: str, expires: datetime) -> None:
        with self._lock:
            self._at[task_id] = expires
            while len(self._at) > self._most:  # a message taken back before it started leaves its entry behind
                self._at.popitem(last=False)

    def pop(self, task_id: str) -> datetime | None:
        with self._lock:
            return self._at.pop(task_id, None)
