"""Synthetic clips for `bench/video_decode.py`, encoded with PyAV and cached: each frame carries its index as a mark."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from video_decoders import MARK_BITS


@dataclass(frozen=True)
class Clip:
    path: Path
    frames: int  # frames encoded, the true n
    desc: str


def draw_mark(frame: np.ndarray, index: int) -> None:
    block = frame.shape[1] // (MARK_BITS + 4)
    for bit in range(MARK_BITS):
        frame[:block, bit * block : (bit + 1) * block] = 235 if index >> bit & 1 else 16


def make_clip(path: Path, seconds: int, width: int, height: int, codec: str, options: dict[str, str]) -> Clip:
    """A moving gradient, a moving box, some noise and the frame index mark; 30 fps, yuv420p. Cached at `path`."""
    fps = 30
    n = seconds * fps
    desc = f"{seconds} s {width}x{height} {fps} fps {codec} ({' '.join(f'{k}={v}' for k, v in options.items())})"
    if path.exists():
        return Clip(path, n, desc)
    import av

    print(f"encoding {path.name}: {desc}", flush=True)
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 256 // width, yy * 256 // height, (xx + yy) * 256 // (width + height)], axis=-1)
    base = base.astype(np.uint8)
    noise = rng.integers(0, 10, (5, height, width, 3), dtype=np.uint8)
    box = height // 4
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format=path.suffix.lstrip(".")) as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 60
        for i in range(n):
            img = base + np.array([3 * i % 256, 2 * i % 256, i % 256], dtype=np.uint8)
            img += noise[i % len(noise)]
            x = 7 * i % (width - box)
            img[height // 2 : height // 2 + box, x : x + box] = (250, 240, 20)
            draw_mark(img, i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    print(f"  {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - started:.0f} s", flush=True)
    return Clip(path, n, desc)
