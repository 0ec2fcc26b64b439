"""Decode steps on SDPA's own grouped-query attention, registered as transformers' `sdpa` attention (the static
decode loop, worker/engines/hf_static.py, turns it on)."""

from __future__ import annotations

from typing import Any

import torch


def grouped_decode_attention() -> None:
    """Make transformers' `sdpa` attention run decode steps on SDPA's own grouped-query support.

    With a mask, transformers' sdpa attention copies every KV head once per query head (`repeat_kv`) before calling
    SDPA: for a decode step that is 7x the KV cache in reads and writes for Qwen2-0.5B (14 query heads, 2 KV heads),
    at batch 192 and 32,768 columns an 11 GB temporary per layer. SDPA takes the grouped heads itself
    (`enable_gqa`, its memory-efficient kernel on CUDA with a mask; the same numbers on CPU, compared bit for bit).
    Registered under `sdpa` through transformers' AttentionInterface, its documented extension point; every other
    call (prefill, the vision tower) goes to transformers' own function unchanged.
    """
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS["sdpa"] is not _grouped_sdpa:
        AttentionInterface.register("sdpa", _grouped_sdpa)


def _grouped_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = key.shape[1] != query.shape[1]
    if query.shape[2] == 1 and grouped and isinstance(attention_mask, torch.Tensor) and not module.training:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
