"""The GPU tests run where the GPU is: often an air-gapped host without SeaweedFS (see docs/air-gapped.md), so their
stack is Redis alone: media as local files (`file://`, allowed), results in Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack
from worker.devtools.local_services import RedisServer


@pytest.fixture
def stack(redis_server: RedisServer, tiny_model: Path, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(redis=redis_server, s3=None, model=tiny_model, workdir=tmp_path)
    yield s
    s.stop_workers()
