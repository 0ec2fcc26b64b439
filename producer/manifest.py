"""Manifests of bulk runs: JSONL, CSV or an S3 prefix in, validated `Job`s out, streamed (never all in memory).

- JSONL: one job object per line, as in the job contract; `custom_id` (or `id`) is the job id.
- CSV: a header with `uri` and optionally `task`, `question`, `prompt`, `custom_id`, `kind`.
- `s3://bucket/prefix/`: every image and video object under the prefix (by extension), optionally filtered by a
  glob on the key; other objects are skipped.

A job without an id gets a stable one: a hash of what decides its output (media, task, text, generation and video
settings), so submitting the same manifest again names the same jobs and finished ones are not run again.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from producer.core.errors import VlmqClientError
from producer.core.jobs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Job, describe_invalid, split_s3_uri

CSV_COLUMNS = ("uri", "task", "question", "prompt", "custom_id", "kind")


@dataclass(frozen=True)
class ManifestError:
    """One bad line of a manifest."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class InvalidManifest(VlmqClientError, ValueError):
    """The manifest has bad lines; nothing was enqueued."""

    def __init__(self, source: str, errors: list[ManifestError], more: int = 0) -> None:
        self.errors = errors
        listed = "\n".join(f"  {e}" for e in errors)
        tail = f"\n  ... and {more} more" if more else ""
        super().__init__(f"{source}: {len(errors) + more} bad lines, nothing was enqueued:\n{listed}{tail}")


def stable_id(job: Job) -> str:
    """A job id that depends only on what the job is (not on when or by whom it is sent): its media, task, text,
    generation and video settings, and metadata (two lines differing only there are two jobs)."""
    decisive = job.model_dump(mode="json", include={"task", "media", "question", "prompt", "messages", "metadata"})
    decisive.update(generation=job.generation.model_dump(mode="json"), video=job.video.model_dump(mode="json"))
    digest = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()
    return f"j-{digest[:32]}"


def _job(fields: dict[str, Any], defaults: dict[str, Any], batch: str | None) -> Job:
    fields = {**defaults, **fields}
    custom_id = fields.pop("custom_id", None)
    if custom_id is not None:
        fields["id"] = custom_id
    if batch is not None:
        fields["batch"] = batch
    job = Job.model_validate(fields)
    if "id" not in fields:
        job.id = stable_id(job)
    return job


def _jsonl(lines: Iterator[str], defaults: dict[str, Any], batch: str | None) -> Iterator[tuple[int, Job | str]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except ValueError as exc:
            yield number, f"not JSON ({exc})"
            continue
        if not isinstance(fields, dict):
            yield number, f"a job must be a JSON object, got {type(fields).__name__}"
            continue
        try:
            yield number, _job(fields, defaults, batch)
        except ValidationError as exc:
            yield number, describe_invalid(exc)


def _csv(lines: Iterator[str], defaults: dict[str, Any], batch: str | None) -> Iterator[tuple[int, Job | str]]:
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if "uri" not in header or unknown:
        yield 1, f"the header must have a `uri` column and only {', '.join(CSV_COLUMNS)}; got {', '.join(header)}"
        return
    for row in reader:
        if None in row:  # csv puts fields beyond the header under the key None
            yield reader.line_num, f"{len(header) + len(row[None])} fields, but the header names {len(header)}"
            continue
        fields: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "") and k != "uri" and k != "kind"}
        uri = row.get("uri") or ""
        fields["media"] = [{"uri": uri, "kind": row["kind"]} if row.get("kind") else uri]
        try:
            yield reader.line_num, _job(fields, defaults, batch)
        except ValidationError as exc:
            yield reader.line_num, describe_invalid(exc)


def _s3_prefix(
    s3: Any, uri: str, glob: str | None, defaults: dict[str, Any], batch: str | None
) -> Iterator[tuple[int, Job | str]]:
    bucket, prefix = split_s3_uri(uri)
    number = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            suffix = PurePosixPath(key).suffix.lower()
            if suffix not in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS or (glob and not fnmatch.fnmatch(key, glob)):
                continue
            number += 1
            try:
                yield number, _job({"media": [f"s3://{bucket}/{key}"]}, defaults, batch)
            except ValidationError as exc:
                yield number, describe_invalid(exc)


def read_manifest(
    source: str,
    *,
    defaults: dict[str, Any] | None = None,
    batch: str | None = None,
    glob: str | None = None,
    s3: Any = None,
) -> Iterator[tuple[int, Job | str]]:
    """(line number, Job or the reason the line is bad) for each job of `source`, lazily.

    `source` is a `.jsonl` or `.csv` path, or an `s3://bucket/prefix/`.
    `defaults` are job fields every line starts from (e.g. `{"task": "qa", "question": ...}`).
    """
    defaults = defaults or {}
    if source.startswith("s3://"):
        if s3 is None:
            raise ValueError("an s3:// manifest needs an S3 client")
        yield from _s3_prefix(s3, source, glob, defaults, batch)
        return
    path = Path(source)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"{source}: a manifest is a .jsonl or .csv file, or an s3://bucket/prefix/")
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: a byte-order mark is not part of the header
        parse = _jsonl if path.suffix.lower() == ".jsonl" else _csv
        yield from parse(iter(handle), defaults, batch)


def validate_manifest(source: str, max_errors: int = 20, **options: Any) -> int:
    """Read the whole manifest; returns its job count, or raises `InvalidManifest` listing its bad lines."""
    errors: list[ManifestError] = []
    more = count = 0
    first_line: dict[str, int] = {}  # job id -> line: a batch holds each job once
    for number, item in read_manifest(source, **options):
        if not isinstance(item, str) and item.id in first_line:
            item = f"job id {item.id!r} is also on line {first_line[item.id]}; give each line its own custom_id"
        if isinstance(item, str):
            if len(errors) < max_errors:
                errors.append(ManifestError(number, item))
            else:
                more += 1
        else:
            first_line[item.id] = number
            count += 1
    if errors:
        raise InvalidManifest(source, errors, more)
    return count
