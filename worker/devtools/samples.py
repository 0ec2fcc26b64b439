"""Synthetic sample images (shapes on a plain background) for `vlmq demo` and `vlmq up`: nothing to ship or fetch."""

from __future__ import annotations

import io
from collections.abc import Iterator

from PIL import Image, ImageDraw


def sample_images(count: int) -> Iterator[tuple[str, bytes]]:
    """Simple synthetic scenes in several sizes and aspect ratios, as JPEG and PNG."""
    sizes = [(640, 480), (480, 640), (384, 384), (1024, 256), (300, 900), (800, 600)]
    palette = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 30), (150, 60, 200), (20, 20, 20)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        image = Image.new("RGB", (w, h), palette[(i + 3) % len(palette)])
        draw = ImageDraw.Draw(image)
        draw.ellipse((w // 8, h // 8, w // 2, h // 2), fill=palette[i % len(palette)])
        draw.rectangle((w // 2, h // 2, w - w // 8, h - h // 8), fill=palette[(i + 1) % len(palette)])
        fmt, ext = ("PNG", "png") if i % 3 == 2 else ("JPEG", "jpg")
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        yield f"samples/scene-{i:02d}.{ext}", buf.getvalue()
