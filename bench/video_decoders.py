"""The decoders `bench/video_decode.py` compares, the process that runs one, and the benchmark's handle on it.

The worker's video job: `NUM_FRAMES` frame indices `np.linspace(0, n - 1, 32, dtype=int)` from a clip held as bytes,
returned as one uint8 array (32, H, W, 3). `serve` is the decoder process (`bench/video_decode.py --serve`): it
imports only the stdlib, numpy and the one decoder, so it also runs under Python 3.12. `Child` starts one and sends
it JSON commands; the answers come back as `RESULT_PREFIX` + JSON lines.
"""

from __future__ import annotations

import gc
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

NUM_FRAMES = 32
MARK_BITS = 12  # frame index drawn as 12 black/white blocks along the top edge
RESULT_PREFIX = "@@result "
SCRIPT = Path(__file__).resolve().with_name("video_decode.py")  # the benchmark; `--serve` runs `serve`


def sample_indices(n: int) -> np.ndarray:
    return np.linspace(0, n - 1, NUM_FRAMES, dtype=int)


def decode_decord(data: bytes) -> tuple[np.ndarray, int]:
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    n = len(vr)
    return vr.get_batch(sample_indices(n)).asnumpy(), n


def count_frames(data: bytes) -> int:
    """Frames in a stream whose container does not say (WebM): its non-empty packets."""
    import av

    count = 0
    with av.open(io.BytesIO(data), "r") as container:
        for packet in container.demux(container.streams.video[0]):
            count += packet.size > 0
    return count


def decode_pyav(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # no slice/frame threads ("AUTO" off): one core
        n = stream.frames or count_frames(data)
        indices = sample_indices(n).tolist()
        wanted, last = set(indices), indices[-1]
        got: dict[int, np.ndarray] = {}
        decoded = 0
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    if len(got) < len(wanted):
        raise RuntimeError(f"stream ended after {decoded} frames, container said {n}")
    return np.stack([got[i] for i in indices]), n


def read_marks(frames: np.ndarray) -> list[int]:
    """The frame index drawn by `draw_mark` into each frame (the middle of each block, thresholded)."""
    block = frames.shape[2] // (MARK_BITS + 4)
    q = block // 4
    marks = []
    for frame in frames:
        value = 0
        for bit in range(MARK_BITS):
            if frame[q : block - q, bit * block + q : (bit + 1) * block - q].mean() > 128:
                value |= 1 << bit
        marks.append(value)
    return marks


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def libavcodec_version() -> str:
    """Version of the libavcodec this process has loaded, from its file name (`libavcodec-<hash>.so.62.28.101`)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        m = re.search(r"libavcodec[^/]*\.so\.([\d.]+)$", line)
        if m:
            return m.group(1)
    return "?"


def run_command(decode: Callable[[bytes], tuple[np.ndarray, int]], clips: dict[str, bytes], cmd: dict) -> dict:
    if cmd["clip"] not in clips:
        clips[cmd["clip"]] = Path(cmd["clip"]).read_bytes()
    data = clips[cmd["clip"]]
    wall_ms, cpu_ms = [], []
    frames: np.ndarray | None = None
    n = 0
    for _ in range(cmd["repeat"]):
        frames = None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        frames, n = decode(data)
        wall_ms.append((time.perf_counter() - wall0) * 1e3)
        cpu_ms.append((time.process_time() - cpu0) * 1e3)
    assert frames is not None
    result: dict[str, Any] = {
        "wall_ms": wall_ms,
        "cpu_ms": cpu_ms,
        "n": n,
        "shape": list(frames.shape),
        "dtype": str(frames.dtype),
        "marks": read_marks(frames),
    }
    if cmd.get("dump"):
        np.save(cmd["dump"], frames)
    del frames
    gc.collect()
    result["rss_kb"] = proc_status_kb("VmRSS")
    result["hwm_kb"] = proc_status_kb("VmHWM")
    return result


def serve(decoder: str) -> None:
    """Answer JSON commands on stdin, one per line, with `RESULT_PREFIX` + JSON lines on the original stdout."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the answers
    base_rss_kb, import_started = proc_status_kb("VmRSS"), time.perf_counter()
    if decoder == "pyav":
        import av

        decode, version = decode_pyav, av.__version__
    else:
        import decord

        decode, version = decode_decord, decord.__version__
    imported = {
        "import_ms": (time.perf_counter() - import_started) * 1e3,
        "base_rss_kb": base_rss_kb,
        "import_rss_kb": proc_status_kb("VmRSS"),
        "nvidia_libs": len(
            {ln.split()[-1] for ln in Path("/proc/self/maps").read_text().splitlines() if "/nvidia/" in ln}
        ),
    }
    clips: dict[str, bytes] = {}
    for line in sys.stdin:
        try:
            result = run_command(decode, clips, json.loads(line))
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
        result.update(imported, version=version, libavcodec=libavcodec_version(), python=platform.python_version())
        out.write(RESULT_PREFIX + json.dumps(result) + "\n")
        out.flush()


class Child:
    """One decoder process, `python bench/video_decode.py --serve --decoder NAME`, driven from the benchmark."""

    def __init__(self, decoder: str, log: Path, pythonpath: Path | None = None, python: str = sys.executable) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("PYTHONPATH", None)
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [python, str(SCRIPT), "--serve", "--decoder", "pyav" if decoder == "pyav" else "decord"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env=env,
        )

    def call(self, **cmd: Any) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith(RESULT_PREFIX):
                    return dict(json.loads(line[len(RESULT_PREFIX) :]))
        except BrokenPipeError:
            pass
        rc = self.proc.wait()
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"process died, exit status {rc}: {' / '.join(tail)}"}

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._log_file.close()
