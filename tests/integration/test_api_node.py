"""A client in another language: a Node.js script (global fetch, no packages: tests/node/api.mjs) submits a job to a
real `vlmq api` and long-polls its result, which is the model card's caption."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from producer.core.jobs import DEFAULT_CAPTION_PROMPT
from tests.apiserver import start_api
from tests.conftest import MEDIA_BUCKET, Stack
from tests.reference import encode, random_image, reference_text

SCRIPT = Path(__file__).resolve().parents[1] / "node" / "api.mjs"
TOKENS = 5


def test_a_node_fetch_client_submits_a_job_and_reads_its_result(stack: Stack) -> None:
    if shutil.which("node") is None:
        pytest.fail("this test needs Node.js 18 or later (global fetch) on PATH")
    body = encode(random_image(40, 30, seed=5), "PNG")
    stack.s3.client().put_object(Bucket=MEDIA_BUCKET, Key="node/api.png", Body=body)
    stack.start_worker()
    api = start_api(stack)
    try:
        job = {"id": "node-fetch-1", "media": [f"s3://{MEDIA_BUCKET}/node/api.png"], "max_new_tokens": TOKENS}
        run = subprocess.run(
            ["node", str(SCRIPT), api.url, str(api.key), json.dumps(job), "30"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        api.stop()
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    text = reference_text(stack.model, [Image.open(io.BytesIO(body)).convert("RGB")], DEFAULT_CAPTION_PROMPT, TOKENS)
    assert answer["code"] == 202
    assert answer["submitted"] == {
        "id": "node-fetch-1",
        "status": "queued",
        "status_url": "/jobs/node-fetch-1",
        "duplicate": False,
    }
    assert answer["status"]["status"] == "succeeded"
    assert answer["status"]["result"]["id"] == "node-fetch-1"
    assert answer["status"]["result"]["text"] == text
