"""VLMQ_ALLOCATOR (worker/allocator.py): what the preprocessing processes inherit, per choice."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from worker import allocator
from worker.errors import ConfigError

TCMALLOC = ctypes.util.find_library("tcmalloc_minimal")


@pytest.fixture(autouse=True)
def tcmalloc_installed() -> None:
    assert TCMALLOC is not None, "libtcmalloc-minimal4 is not installed: `make install` installs it"


def test_auto_and_tcmalloc_preload_tcmalloc_once_before_what_was_preloaded() -> None:
    env = {"LD_PRELOAD": "libfoo.so"}
    assert allocator.configure("auto", env).startswith("tcmalloc")
    assert env == {"LD_PRELOAD": f"{TCMALLOC} libfoo.so"}
    allocator.configure("tcmalloc", env)
    assert env == {"LD_PRELOAD": f"{TCMALLOC} libfoo.so"}


def test_glibc_raises_the_thresholds_and_keeps_values_the_user_set() -> None:
    env = {"MALLOC_TRIM_THRESHOLD_": "1000"}
    assert allocator.configure("glibc", env) == "glibc with raised mmap and trim thresholds"
    assert env == {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1000"}


def test_system_changes_nothing() -> None:
    env: dict[str, str] = {}
    assert allocator.configure("system", env) == "the system's (VLMQ_ALLOCATOR=system)"
    assert env == {}


def test_tcmalloc_asked_for_but_missing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(ConfigError, match="apt-get install libtcmalloc-minimal4"):
        allocator.configure("tcmalloc", {})
    env: dict[str, str] = {}
    allocator.configure("auto", env)  # auto falls back to glibc's thresholds
    assert set(env) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}


def test_a_process_started_with_that_environment_runs_on_tcmalloc() -> None:
    env: dict[str, str] = {}
    allocator.configure("tcmalloc", env)
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env, capture_output=True, text=True
    ).stdout
    assert "libtcmalloc_minimal" in maps
