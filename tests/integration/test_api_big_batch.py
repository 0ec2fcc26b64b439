"""A 200 MB OpenAI Batch API input file through a real `vlmq api` process: uploaded, stored in the staging bucket
and turned into jobs line by line, while the process stays under 300 MB resident (its peak, VmHWM)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from producer.api.media import sniff
from producer.api.openai_files import Files
from producer.api.settings import ApiSettings
from tests.apiserver import STAGING_BUCKET, module_stack, start_api
from tests.conftest import Stack

__all__ = ["module_stack"]

LINES, LINE_BYTES = 50, 4_000_000  # 200 MB: each line a chat request with one ~3 MB data: URL image
MAX_RESIDENT = 300 * 1024 * 1024


def write_requests(path: Path) -> int:
    """The input file: LINES requests of LINE_BYTES each, and 2 lines that never become jobs; returns its size."""
    image = b"\x89PNG\r\n\x1a\n" + (bytes(range(256)) * (LINE_BYTES // 256))[: LINE_BYTES * 3 // 4 - 8]
    assert sniff(image) is not None
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    with path.open("w") as f:
        for n in range(LINES):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"What is {n}?"}]
            body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
            line = {"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(json.dumps(line) + "\n")
        f.write(json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}) + "\n")
        f.write("not json\n")
    return path.stat().st_size


def peak_resident(pid: int) -> int:
    """The process's peak resident set size so far, in bytes (VmHWM in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(300)
def test_a_200_mb_batch_file_is_streamed_in_and_read_line_by_line_under_300_mb_resident(
    module_stack: Stack, tmp_path: Path
) -> None:
    size = write_requests(tmp_path / "requests.jsonl")
    api = start_api(module_stack, name="api-big-batch")
    try:
        with api.client(timeout=300) as http, (tmp_path / "requests.jsonl").open("rb") as f:
            started = time.monotonic()
            uploaded = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("requests.jsonl", f)})
            assert uploaded.status_code == 200, uploaded.text
            upload_s, peak_upload = time.monotonic() - started, peak_resident(api.service.proc.pid)
            create = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions"}
            batch_id = http.post("/v1/batches", json={**create, "completion_window": "24h"}).json()["id"]
            sent = module_stack.client().batch(batch_id)
            while sent.status().status in ("unknown", "submitting"):  # its lines become jobs after the answer
                assert time.monotonic() < started + 240, f"batch {batch_id} still validating"
                time.sleep(0.5)
            validate_s, peak = time.monotonic() - started - upload_s, peak_resident(api.service.proc.pid)
            batch = http.get(f"/v1/batches/{batch_id}").json()
            cancelled = http.post(f"/v1/batches/{batch_id}/cancel").json()  # no worker here: end it
    finally:
        api.stop()

    print(
        f"\nbatch input file of {size / 1e6:.0f} MB: uploaded in {upload_s:.1f} s, its lines jobs {validate_s:.1f} s "
        f"later; the API process's peak resident {peak_upload / 2**20:.0f} MiB after the upload, "
        f"{peak / 2**20:.0f} MiB in all"
    )
    assert size > 200_000_000
    assert (uploaded.json()["bytes"], uploaded.json()["filename"]) == (size, "requests.jsonl")
    assert (batch["status"], batch["request_counts"]["total"]) == ("in_progress", LINES + 2)
    assert sent.status().total == LINES
    assert cancelled["status"] in ("cancelling", "cancelled")
    assert peak < MAX_RESIDENT, f"peak resident {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("read_bytes", [3, 1 << 20])
def test_an_input_file_is_read_a_line_at_a_time_and_a_line_over_the_limit_is_not_kept(
    module_stack: Stack, read_bytes: int
) -> None:
    files = Files(ApiSettings(staging_bucket=STAGING_BUCKET), module_stack.s3.client())
    stored = files.put(b"a\n\nbb\r\n" + b"x" * 25 + b"\n" + b"0123456789\n" + b"tail", "in.jsonl", "batch")

    lines = list(files.lines(stored["id"], most=11, read_bytes=read_bytes))

    assert lines == [b"a\n", b"\n", b"bb\r\n", None, b"0123456789\n", b"tail"]
