"""A fix to vLLM 0.32, loaded in each of vLLM's processes through its plugin entry point (`vllm.general_plugins`).

LLaVA-OneVision in vLLM 0.32 returns one (1, tokens, dim) tensor per video when the videos its encoder batches
together have different frame counts (`_process_video_pixels`, list branch; the equal-count branch returns
(tokens, dim) per video), and the model runner's sanity check then kills the engine core: "Expected multimodal
embeddings to be a sequence of 2D tensors". A worker that receives an 8-frame and a 16-frame video job at once would
die on it. The fix drops that leading 1; the values are untouched.
"""

from __future__ import annotations

from typing import Any


def register() -> None:
    """vLLM calls this in every process it starts; idempotent."""
    from vllm.model_executor.models import llava_onevision

    model = llava_onevision.LlavaOnevisionForConditionalGeneration
    original = model._process_video_pixels
    if getattr(original, "vlmq_two_dimensional", False):
        return

    def _process_video_pixels(self: Any, inputs: Any) -> Any:
        embeddings = original(self, inputs)
        if isinstance(embeddings, list):
            return [e.squeeze(0) if e.dim() == 3 and e.shape[0] == 1 else e for e in embeddings]
        return embeddings

    _process_video_pixels.vlmq_two_dimensional = True  # type: ignore[attr-defined]
    model._process_video_pixels = _process_video_pixels
