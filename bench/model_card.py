"""The model card's code, one image or video per `generate`, in this process: the GPU benchmark's bare loop."""

from __future__ import annotations

import gc
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

NEW_TOKENS, FRAMES = 60, 32
IMAGE_PROMPT = "Describe this image in detail."  # the caption task's prompt
VIDEO_PROMPT = "What happens in this video?"


def sample_frames(data: bytes, start_s: float, end_s: float) -> np.ndarray:
    """The frames vlmq samples for a window: lmms-eval's linspace over its first..last frame."""
    import math

    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    fps, n = reader.get_avg_fps(), len(reader)
    first, last = math.ceil(start_s * fps), min(n - 1, math.floor(end_s * fps))
    return reader.get_batch(list(np.linspace(first, last, FRAMES, dtype=int))).asnumpy()


class ModelCardLoop:
    """The model card's code in this process, one image or video per `generate`, in the engines' dtype."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        self.cuda = torch.cuda.is_available()
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.device = "cuda:0" if self.cuda else "cpu"
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=self.dtype)
        self.model: Any = model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)

    def run(self, kind: str, media: Any) -> tuple[float, int]:
        """One job: (seconds in `generate`, tokens generated)."""
        import torch

        text = IMAGE_PROMPT if kind == "image" else VIDEO_PROMPT
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        key = "images" if kind == "image" else "videos"
        inputs = self.processor(**{key: media}, text=prompt, return_tensors="pt").to(self.device, self.dtype)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, out.shape[1] - inputs["input_ids"].shape[1]

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()  # the vllm worker takes a share of what is free
