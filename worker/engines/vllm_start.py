"""What vLLM needs to start well: a KV cache sized for this worker on CPU, and a failed start told in one line.

KV cache on CPU. vLLM's CPU worker reserves `gpu_memory_utilization` (0.9) of the machine's RAM unless it is given
a KV cache size, and refuses to start when that much is not free (vllm/v1/worker/cpu_worker.py, 0.32), which on a
machine running anything else is always. A worker never has more than `min(max_num_seqs, its jobs in flight)`
requests in vLLM at once, each at most `max_model_len` tokens, so the cache it can use is that many tokens times
the checkpoint's KV bytes per token. vlmq passes that (`kv_cache_memory_bytes`), capped at a quarter of the
memory available when the worker starts. `VLLM_CPU_KVCACHE_SPACE` (GiB), vLLM's own setting, still wins: vLLM
applies it over ours (vllm/platforms/cpu.py), and vlmq then sizes nothing.

Start-up output. vLLM's engine core and its worker run in their own processes and print their own tracebacks when
they fail; the exception this process gets only says "See root cause above". `HeldOutput` holds what this process
and its children write to stdout and stderr while the engine starts: on success it is written out and the children's
later output passes through; on failure it goes to a log file and `root_cause` finds the first real error in it.
"""

from __future__ import annotations

import array
import fcntl
import math
import os
import re
import select
import sys
import tempfile
import termios
import threading
from dataclasses import dataclass, field
from typing import Any

from worker.errors import ConfigError
from worker.settings import WorkerSettings

KV_SHARE_OF_AVAILABLE = 0.25
_TOKEN_ROUNDING = 256  # vLLM allocates whole blocks (128 tokens on CPU): room for a last, partial one
GiB = 1 << 30
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_VLLM_LOG_PREFIX = re.compile(r"^\(.*?pid=\d+\) [A-Z]+ \S+ \S+ \[[^\]]*\] ")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
# vLLM's own wrappers around the real error: never the root cause
_WRAPPERS = ("See root cause above", "See stack trace for root cause", "initialization failed")


@dataclass(frozen=True)
class KVCacheSize:
    """The KV cache a vLLM worker on CPU gets, and how it was arrived at (for its log line)."""

    bytes: int
    sequences: int
    tokens: int  # per sequence
    per_token: int
    available: int

    def describe(self) -> str:
        return (
            f"{self.bytes / GiB:.2f} GiB for {self.sequences} sequences of {self.tokens:,} tokens at "
            f"{self.per_token:,} bytes per token, at most {KV_SHARE_OF_AVAILABLE:.0%} of the "
            f"{self.available / GiB:.1f} GiB available (VLLM_CPU_KVCACHE_SPACE=GiB overrides it)"
        )


def kv_bytes_per_token(text_config: Any, dtype: str) -> int:
    """Keys and values of one token over every layer: 2 x layers x KV heads x head size x bytes per value."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * heads * head_dim * _DTYPE_BYTES[dtype]


def size_kv_cache(per_token: int, max_model_len: int, sequences: int, available: int) -> KVCacheSize:
    """`sequences` of `max_model_len` tokens, capped at a share of `available` bytes.

    Raises:
        ConfigError: not even one sequence of `max_model_len` tokens fits in the share (vLLM would refuse it too).
    """
    tokens = math.ceil(max_model_len / _TOKEN_ROUNDING) * _TOKEN_ROUNDING
    cap = int(available * KV_SHARE_OF_AVAILABLE)
    if per_token * tokens > cap:
        raise ConfigError(
            f"vLLM's KV cache for one sequence of max_model_len={max_model_len:,} tokens needs "
            f"{per_token * tokens / GiB:.2f} GiB, more than {KV_SHARE_OF_AVAILABLE:.0%} of the "
            f"{available / GiB:.1f} GiB of memory available. Hint: lower --max-model-len (VLMQ_MAX_MODEL_LEN), free "
            "memory, or set VLLM_CPU_KVCACHE_SPACE (GiB) yourself"
        )
    return KVCacheSize(min(per_token * tokens * sequences, cap), sequences, tokens, per_token, available)


def cpu_kv_cache(settings: WorkerSettings, dtype: str) -> KVCacheSize | None:
    """The KV cache a vLLM worker on CPU with these settings gets; None when VLLM_CPU_KVCACHE_SPACE sets it."""
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") != "":
        return None
    import psutil
    from transformers import AutoConfig

    text_config = AutoConfig.from_pretrained(settings.model).get_text_config()
    max_model_len = settings.max_model_len or text_config.max_position_embeddings
    sequences = min(settings.max_num_seqs, settings.in_flight)
    per_token = kv_bytes_per_token(text_config, dtype)
    return size_kv_cache(per_token, max_model_len, sequences, psutil.virtual_memory().available)


def root_cause(output: str) -> str | None:
    """The first exception line in vLLM's output that is not one of its wrappers: `ValueError: Available memory ...`."""
    for line in output.splitlines():
        match = _EXCEPTION_LINE.match(_VLLM_LOG_PREFIX.sub("", line.strip()))
        if match and not any(wrapper in match.group(2) for wrapper in _WRAPPERS):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}"
    return None


def _unread(fd: int) -> int:
    """Bytes waiting in a pipe."""
    waiting = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, waiting)
    except OSError:  # closed: its pump read everything
        return 0
    return waiting[0]


@dataclass
class HeldOutput:
    """Holds what this process and the processes it starts write to file descriptors 1 and 2 (see the module)."""

    _saved: dict[int, int] = field(default_factory=dict)
    _held: list[tuple[int, bytes]] = field(default_factory=list)
    _holding: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pumps: list[threading.Thread] = field(default_factory=list)
    _read_ends: list[int] = field(default_factory=list)

    def __enter__(self) -> HeldOutput:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            self._read_ends.append(read_end)
            pump = threading.Thread(target=self._pump, args=(read_end, fd), name=f"vlmq-output-{fd}", daemon=True)
            pump.start()
            self._pumps.append(pump)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._holding:  # not released: an error left the block
            self._restore()

    def _pump(self, read_end: int, fd: int) -> None:
        # Reads only under the lock, once select says a read will not block: `release`, holding the lock, then
        # knows that no chunk is between the pipe and `_held`, so what it writes out comes first.
        while True:
            readable, _, _ = select.select([read_end], [], [], 0.05)
            if not readable:
                continue
            with self._lock:
                chunk = os.read(read_end, 65536)
                if not chunk:  # every writer (this process, its children) has closed it
                    break
                if self._holding:
                    self._held.append((fd, chunk))
                else:
                    os.write(self._saved[fd], chunk)
        os.close(read_end)

    def _restore(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # this process writes to its own output again; children keep writing to the pipes

    def release(self) -> None:
        """The engine started: write out what was held; from now on the children's output passes straight through."""
        self._restore()
        with self._lock:  # what this process wrote before is in the pipes or held: it comes out first
            for read_end, fd in zip(self._read_ends, (1, 2), strict=True):
                while _unread(read_end):
                    self._held.append((fd, os.read(read_end, 65536)))
            for fd, chunk in self._held:
                os.write(self._saved[fd], chunk)
            self._held.clear()
            self._holding = False

    def failed(self, wait_s: float = 5.0) -> tuple[str, str]:
        """The engine did not start: (everything held, once the children have closed their output or after
        `wait_s`; the path of a log file holding it)."""
        self._restore()
        for pump in self._pumps:
            pump.join(wait_s)
        with self._lock:
            text = b"".join(chunk for _, chunk in self._held).decode(errors="replace")
        fd, path = tempfile.mkstemp(prefix="vlmq-vllm-start-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            log.write(text)
        return text, path
