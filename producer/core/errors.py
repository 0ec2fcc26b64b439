"""Errors the producer side raises: the shared core's, here, and `producer.manifest.InvalidManifest`. Catch
`VlmqClientError` for all of them; each also keeps a builtin base, so `except TimeoutError` / `except ValueError` /
`except RuntimeError` work too.

VlmqClientError
├── ResultTimeout      (also TimeoutError)  no result within the timeout; the job may still be queued or running
├── InvalidBatchName   (also ValueError)    a batch name outside [A-Za-z0-9._:-]{1,128}
├── InvalidManifest    (also ValueError)    a manifest has bad lines; nothing was enqueued (producer.manifest)
├── MissingExtra       (also RuntimeError)  an optional dependency is not installed (Parquet needs pyarrow)
├── ResultWriteError                        a result object could not be written to S3 (workers wrap it)
└── CannotStart        (also RuntimeError)  a process cannot start: its broker or a bucket is missing (exit 2)

A job that breaks the contract raises pydantic's `ValidationError` (its message names the field), as `Job(...)`
itself does: it is not in this tree.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

Location = tuple[int | str, ...]


class VlmqClientError(Exception):
    """Base of every error the producer side raises on its own."""


class ResultTimeout(VlmqClientError, TimeoutError):
    """No result within the timeout; the job may still be queued or running."""


class InvalidBatchName(VlmqClientError, ValueError):
    """A batch name outside the job id alphabet: letters, digits and `. _ : -`, at most 128."""


class MissingExtra(VlmqClientError, RuntimeError):
    """An optional dependency is not installed; the message names the extra to install."""


class ResultWriteError(VlmqClientError):
    """A result object could not be written to S3 (the worker turns it into its `result_write_failed` error)."""


class CannotStart(VlmqClientError, RuntimeError):
    """`vlmq worker` or `vlmq api` cannot start: the broker does not answer (worker), or a bucket does not exist.
    The message says what to do; the command prints it as one line and exits with status 2."""


def one_line(exc: ValidationError, name_of: Callable[[Location], str], secret: Collection[str] = ()) -> str:
    """A ValidationError as the one line a command prints: `NAME=VALUE: what it must be` per error (NAME: `name_of`
    the error's location; VALUE cut at 60 characters, and hidden for the fields in `secret`), or the message alone
    for a check across fields (its message names them).

    (`producer.core.jobs.describe_invalid` writes the `invalid_job` text a job's result carries: fields by their
    place in the job JSON, no values.)"""
    parts = []
    for error in exc.errors(include_url=False):
        why = str(error["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
        location = tuple(error["loc"])
        if not any(isinstance(part, str) for part in location):
            parts.append(why)
            continue
        value = "(hidden)" if location[0] in secret else str(error.get("input", ""))
        value = value if len(value) <= 60 else value[:57] + "..."
        parts.append(f"{name_of(location)}={value}: {why}")
    return "; ".join(parts)
