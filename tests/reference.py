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
    """apply_chat_template + processor + greedy generate + decode of the new tokens, as on the model card."""
    import torch

    model, processor = load(str(model_dir))
    conversation = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=images, text=prompt, return_tensors="pt")
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
