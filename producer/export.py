"""Batch results into files: JSONL, or Parquet (with pyarrow, the `parquet` extra)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any

from producer.core.jobs import JobResult
from producer.errors import MissingExtra

Counts = tuple[int, int, int]
"""(succeeded, failed, without a result yet)"""

_PARQUET_FIELDS = (
    "id",
    "status",
    "text",
    "error_code",
    "error_message",
    "model",
    "worker",
    "attempts",
    "batch_size",
    "metadata",
    "finished_at",
)


def write_results(results: Callable[[IO[str], IO[str]], Counts], path: str, errors_path: str) -> Counts:
    """Let `results(out, errors)` write JobResult JSON lines into files: JSONL, or Parquet when `path` ends with
    `.parquet` (the errors file too).

    Raises:
        MissingExtra: Parquet output without pyarrow installed.
    """
    if not path.endswith(".parquet"):
        with open(path, "w", encoding="utf-8") as out, open(errors_path, "w", encoding="utf-8") as errors:
            return results(out, errors)
    out_parquet, errors_parquet = _ParquetLines(path), _ParquetLines(errors_path)
    try:
        return results(out_parquet, errors_parquet)  # type: ignore[arg-type]  # anything with write()
    finally:
        out_parquet.close()
        errors_parquet.close()


def _parquet_row(result: JobResult) -> dict[str, Any]:
    """A JobResult flattened for Parquet: the error's code and message as columns, metadata as a JSON string."""
    data = result.model_dump(mode="json")
    error = data.pop("error") or {}
    return {
        **{k: data[k] for k in ("id", "status", "text", "model", "worker", "attempts", "batch_size", "finished_at")},
        "error_code": error.get("code"),
        "error_message": error.get("message"),
        "metadata": json.dumps(data["metadata"]),
    }


class _ParquetLines:
    """A `write(line)` target that collects JobResult JSON lines into a Parquet file, a row group per 10,000."""

    def __init__(self, path: str) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingExtra("Parquet output needs pyarrow: pip install -e '.[parquet]' in vlmq's checkout") from None
        self.pa = pa
        fields = [(n, pa.int64() if n in ("attempts", "batch_size") else pa.string()) for n in _PARQUET_FIELDS]
        self.schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(path, self.schema)
        self.rows: list[dict[str, Any]] = []

    def write(self, line: str) -> None:
        self.rows.append(_parquet_row(JobResult.model_validate_json(line)))
        if len(self.rows) >= 10_000:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()
