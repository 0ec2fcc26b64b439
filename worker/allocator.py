"""The memory allocator of a worker's processes (`VLMQ_ALLOCATOR`), set where `vlmq worker` starts.

The image processor allocates and frees large buffers for every job. glibc's malloc hands buffers above its mmap
threshold back to the kernel on every free, so each job faults its pages in again: on a 640x480 JPEG, thousands
of minor page faults and about a quarter of the processor's CPU (BENCHMARKS.md, "Allocator"). Measured there:
tcmalloc (Debian's libtcmalloc-minimal4) was cheapest, glibc with raised thresholds close behind, jemalloc with
its default decay the dearest.

- `tcmalloc`: the preprocessing processes start with it preloaded (`LD_PRELOAD`, inherited when they are spawned);
- `glibc`: they start with `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` raised;
- `auto` (the default): tcmalloc when it is installed, else glibc;
- `system`: nothing is changed (for comparisons, or an allocator preloaded by the user).

Except with `system`, the engine's own process raises glibc's thresholds through `mallopt` (a running process
cannot change allocators; with `--preprocess-workers 0` it runs the processor itself). The Docker image installs
libtcmalloc-minimal4, so `auto` picks tcmalloc there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from worker.errors import ConfigError

log = logging.getLogger(__name__)

TCMALLOC = "tcmalloc_minimal"
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed on 64-bit: buffers up to it are reused, not unmapped
TRIM_THRESHOLD = 128 * 1024 * 1024  # free memory kept before the heap's top is returned to the kernel
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def configure(allocator: str, environ: dict[str, str] | None = None) -> str:
    """Apply `allocator` to this process and to `environ` (default `os.environ`), which the preprocessing
    processes inherit; returns what was chosen, for the log.

    Raises:
        ConfigError: `tcmalloc` was asked for and is not installed.
    """
    env = os.environ if environ is None else environ
    if allocator == "system":
        return "the system's (VLMQ_ALLOCATOR=system)"
    _raise_glibc_thresholds()
    tcmalloc = ctypes.util.find_library(TCMALLOC)
    if allocator == "tcmalloc" and tcmalloc is None:
        raise ConfigError(
            "VLMQ_ALLOCATOR=tcmalloc, but libtcmalloc_minimal is not installed. Hint: apt-get install "
            "libtcmalloc-minimal4 (Debian, Ubuntu), or VLMQ_ALLOCATOR=glibc"
        )
    if allocator in ("auto", "tcmalloc") and tcmalloc is not None:
        preload = env.get("LD_PRELOAD", "")
        if tcmalloc not in preload:
            env["LD_PRELOAD"] = f"{tcmalloc} {preload}".strip()
        return f"tcmalloc ({tcmalloc}) in the preprocessing processes, glibc with raised thresholds here"
    for name, value in GLIBC_ENV.items():
        env.setdefault(name, value)
    return "glibc with raised mmap and trim thresholds"


def _raise_glibc_thresholds() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
