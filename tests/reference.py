"""The model card's code for one job alone: the ground truth that batched worker output must equal exactly."""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image


@cache
def load(model_dir: str):  # -> (model, processor)
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


def reference_text(model_dir: Path, images: list[Image.Image], text: str, max_new_tokens: int) -> str:
    """The model card's single-turn image prompt: the images, then the text."""
    conversation = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}]}]
    return reference_chat(model_dir, conversation, images, [], max_new_tokens)


def reference_chat(
    model_dir: Path,
    conversation: list[dict],
    images: list[Image.Image],
    videos: list[np.ndarray],
    max_new_tokens: int,
) -> str:
    """apply_chat_template + processor + greedy generate + decode of the new tokens, as on the model card."""
    import torch

    model, processor = load(str(model_dir))
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=images or None, videos=videos or None, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """A noisy image with some structure, so different images give different model inputs."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 3] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def video_frames(data: bytes, num_frames: int, start_s: float | None = None, end_s: float | None = None) -> np.ndarray:
    """Frames at lmms-eval's indices for LLaVA-OneVision: linspace over the first..last frame of the window."""
    import math

    import decord

    reader = decord.VideoReader(io.BytesIO(data))
    n, fps = len(reader), reader.get_avg_fps()
    first = 0 if start_s is None else math.ceil(start_s * fps)
    last = n - 1 if end_s is None else min(n - 1, math.floor(end_s * fps))
    return reader.get_batch(list(np.linspace(first, last, num_frames, dtype=int))).asnumpy()


def make_clip(frames: int, width: int, height: int, fps: int, seed: int, codec: str = "h264") -> bytes:
    """A small clip of noisy frames, encoded with PyAV (H.264 in MP4, or VP9 in WebM)."""
    import av

    fmt = "webm" if codec == "libvpx-vp9" else "mp4"
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libvpx-vp9":
            stream.options = {"crf": "30", "b": "0"}  # libvpx refuses to open without a rate control mode
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()
