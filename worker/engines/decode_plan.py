"""The static decode loop's shapes and memory budget: pure arithmetic, no torch.

A captured CUDA graph replays fixed shapes, so the hf engine decodes in a bounded set of them: a batch's rows are
padded up to a *row bucket* and its cache to a *length bucket* (prompt plus answer). Every (rows, length) pair whose
KV cache fits the pool is built once at start-up; serving never builds another.

The pool's size comes from device memory: what is free once the weights are loaded, less the prefill's activations,
over the checkpoint's KV bytes per token (layers x KV heads x head size x 2 (keys, values) x dtype bytes). A batch
is as large as its longest prompt allows: rows x length bucket <= pool tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LENGTH_BUCKETS = (512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768)
# Of the memory the engine may use (free after loading x --gpu-memory-utilization): the share kept for one prefill's
# activations (the vision tower over every crop, the language model over every prompt token), the rest is KV cache.
PREFILL_SHARE = 0.25
# Kept back for the captured graphs' own memory pool, the next batch's inputs and the allocator's fragmentation.
GRAPH_RESERVE_BYTES = 2 * 1024**3
PREFILL_SAFETY = 1.5  # measured activation bytes per prompt token, times this


@dataclass(frozen=True)
class KVShape:
    """The KV cache of one token in a checkpoint's language model."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def of(cls, text_config: Any, dtype_bytes: int) -> KVShape:
        """Read from a transformers text config (Qwen2's: num_hidden_layers, num_key_value_heads, head_dim)."""
        heads = int(text_config.num_attention_heads)
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads
        return cls(int(text_config.num_hidden_layers), int(kv_heads), int(head_dim), dtype_bytes)


@dataclass(frozen=True)
class DecodePlan:
    """The shapes the static decode loop runs in and the token budgets that bound them.

    Args:
        kv_tokens: token slots in the KV pool; a decode of R rows in a cache of length L needs R x L of them.
        prefill_tokens: most prompt tokens (rows x their longest prompt) one prefill call takes.
        max_rows: most jobs decoded together (the batch cap).
        max_length: longest cache (prompt plus answer) built; a longer job decodes outside the plan.
    """

    kv_tokens: int
    prefill_tokens: int
    max_rows: int
    max_length: int

    def __post_init__(self) -> None:
        if min(self.kv_tokens, self.prefill_tokens, self.max_rows, self.max_length) < 1:
            raise ValueError(f"every budget of a decode plan must be >= 1: {self}")

    @property
    def row_buckets(self) -> tuple[int, ...]:
        return tuple(sorted({b for b in ROW_BUCKETS if b < self.max_rows} | {self.max_rows}))

    @property
    def length_buckets(self) -> tuple[int, ...]:
        return tuple(sorted({b for b in LENGTH_BUCKETS if b < self.max_length} | {self.max_length}))

    def rows_for(self, rows: int) -> int:
        """The row bucket a decode of `rows` jobs runs in (padding rows decode nothing anyone reads)."""
        buckets = self.row_buckets
        return buckets[min(bisect.bisect_left(buckets, rows), len(buckets) - 1)]

    def length_for(self, prompt_tokens: int, new_tokens: int) -> int | None:
        """The cache length bucket for a decode whose longest prompt is `prompt_tokens`, or None past the longest.

        The last generated token is never fed back, so a cache holds prompt + new tokens - 1 positions.
        """
        needed = prompt_tokens + new_tokens - 1
        buckets = self.length_buckets
        i = bisect.bisect_left(buckets, needed)
        return buckets[i] if i < len(buckets) else None

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) pair the pool holds: the graphs built at start-up."""
        return [(r, n) for n in self.length_buckets for r in self.row_buckets if r * n <= self.kv_tokens]

    def fits(self, prompt_tokens: Sequence[int], new_tokens: int) -> bool:
        """Whether jobs with these prompt lengths decode together in one shape of the plan."""
        if len(prompt_tokens) > self.max_rows:
            return False
        length = self.length_for(max(prompt_tokens), new_tokens)
        return length is not None and self.rows_for(len(prompt_tokens)) * length <= self.kv_tokens

    def decode_groups(self, prompt_tokens: Sequence[int], new_tokens: int) -> tuple[list[list[int]], list[int]]:
        """Split a batch into decodes that fit, shortest prompts first; returns (groups of indices, indices that no
        shape of the plan holds even alone: they decode outside it)."""
        order = sorted(range(len(prompt_tokens)), key=lambda i: prompt_tokens[i])
        outside = [i for i in order if self.length_for(prompt_tokens[i], new_tokens) is None]
        groups: list[list[int]] = []
        for i in (i for i in order if i not in outside):
            if groups and self.fits([prompt_tokens[j] for j in groups[-1]] + [prompt_tokens[i]], new_tokens):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups, outside

    def prefill_groups(self, prompt_tokens: Sequence[int]) -> list[list[int]]:
        """Split one decode's rows (given shortest first) into prefill calls of at most `prefill_tokens` tokens
        (rows x longest prompt of the call); a prompt longer than the budget is prefilled alone."""
        groups: list[list[int]] = []
        for i, n in enumerate(prompt_tokens):
            longest = max([n] + [prompt_tokens[j] for j in groups[-1]]) if groups else n
            if groups and (len(groups[-1]) + 1) * longest <= self.prefill_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups


def memory_plan(
    free_bytes: int,
    utilization: float,
    kv: KVShape,
    prefill_bytes_per_token: float,
    max_rows: int,
    max_length: int,
) -> DecodePlan:
    """A plan sized from device memory (see the module docstring).

    Args:
        free_bytes: device memory free once the weights are loaded.
        utilization: share of it the engine may take (--gpu-memory-utilization).
        kv: the checkpoint's KV cache per token.
        prefill_bytes_per_token: activation bytes one prompt token costs in a prefill (measured at start-up).
        max_rows: the batch cap.
        max_length: the longest cache to build (the model's context, or --max-model-len).

    Raises:
        ValueError: the memory left holds less than the shortest cache length bucket.
    """
    usable = free_bytes * utilization - GRAPH_RESERVE_BYTES
    prefill_tokens = int(usable * PREFILL_SHARE / (prefill_bytes_per_token * PREFILL_SAFETY))
    kv_tokens = int(usable * (1 - PREFILL_SHARE) / kv.bytes_per_token)
    if kv_tokens < LENGTH_BUCKETS[0] or prefill_tokens < LENGTH_BUCKETS[0]:
        raise ValueError(
            f"{free_bytes / 1024**3:.1f} GiB free on the device after loading the model leaves room for "
            f"{max(kv_tokens, 0)} KV-cache tokens and {max(prefill_tokens, 0)} prefill tokens. Hint: free the GPU, "
            "raise --gpu-memory-utilization, or turn the static decode loop off with --no-cuda-graphs"
        )
    return DecodePlan(
        kv_tokens=kv_tokens,
        prefill_tokens=prefill_tokens,
        max_rows=max_rows,
        max_length=min(max_length, kv_tokens),
    )
