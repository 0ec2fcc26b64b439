"""The static decode loop's shapes and memory budget (worker/engines/decode_plan.py): pure arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker.engines.decode_plan import GRAPH_RESERVE_BYTES, DecodePlan, KVShape, memory_plan

GIB = 1024**3
# llava-onevision-qwen2-0.5b's language model (Qwen2-0.5B), as its config.json gives it.
QWEN2_0_5B = SimpleNamespace(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=896)


def test_kv_bytes_per_token_of_the_0_5b_model_in_bf16() -> None:
    kv = KVShape.of(QWEN2_0_5B, dtype_bytes=2)
    assert (kv.layers, kv.kv_heads, kv.head_dim) == (24, 2, 64)
    assert kv.bytes_per_token == 2 * 24 * 2 * 64 * 2 == 12_288


def test_a_config_without_kv_heads_has_one_per_attention_head() -> None:
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, head_dim=None)
    assert KVShape.of(config, dtype_bytes=4) == KVShape(layers=2, kv_heads=4, head_dim=16, dtype_bytes=4)


def test_buckets_end_at_the_batch_cap_and_the_longest_cache() -> None:
    plan = DecodePlan(kv_tokens=100_000, prefill_tokens=10_000, max_rows=20, max_length=5000)
    assert plan.row_buckets == (1, 2, 4, 8, 12, 16, 20)
    assert plan.length_buckets == (512, 1024, 1536, 2048, 3072, 4096, 5000)
    assert [plan.rows_for(n) for n in (1, 3, 9, 13, 17, 20)] == [1, 4, 12, 16, 20, 20]


def test_a_cache_holds_the_prompt_and_all_but_the_last_new_token() -> None:
    plan = DecodePlan(kv_tokens=100_000, prefill_tokens=10_000, max_rows=8, max_length=4096)
    assert plan.length_for(prompt_tokens=2952, new_tokens=60) == 3072  # a 640x480 image's prompt, 60 new tokens
    assert plan.length_for(prompt_tokens=1000, new_tokens=25) == 1024  # 1,024 positions exactly
    assert plan.length_for(prompt_tokens=1000, new_tokens=26) == 1536
    assert plan.length_for(prompt_tokens=4000, new_tokens=200) is None


def test_the_shapes_built_are_those_whose_cache_fits_the_pool() -> None:
    plan = DecodePlan(kv_tokens=4096, prefill_tokens=4096, max_rows=8, max_length=2048)
    assert plan.shapes() == [
        (1, 512), (2, 512), (4, 512), (8, 512),
        (1, 1024), (2, 1024), (4, 1024),
        (1, 1536), (2, 1536),
        (1, 2048), (2, 2048),
    ]  # fmt: skip


def test_a_batch_fits_while_its_padded_rows_times_its_cache_bucket_fit_the_pool() -> None:
    plan = DecodePlan(kv_tokens=4096, prefill_tokens=4096, max_rows=8, max_length=2048)
    assert plan.fits([100] * 8, new_tokens=12)  # 8 x 512
    assert not plan.fits([100] * 7 + [600], new_tokens=12)  # 8 x 1024
    assert plan.fits([100, 600, 600], new_tokens=12)  # 3 rows run as 4: 4 x 1024
    assert not plan.fits([100] * 5 + [600], new_tokens=12)  # 6 rows run as 8
    assert not plan.fits([3000], new_tokens=12)  # longer than every shape


def test_decode_groups_take_the_shortest_prompts_first_and_leave_out_what_no_shape_holds() -> None:
    plan = DecodePlan(kv_tokens=2048, prefill_tokens=4096, max_rows=4, max_length=1536)
    lengths = [700, 100, 1600, 120, 300, 110, 900]
    groups, outside = plan.decode_groups(lengths, new_tokens=20)
    assert outside == [2]
    assert groups == [[1, 5, 3, 4], [0, 6]]  # 4 rows x 512, then 2 x 1,024


def test_prefill_calls_stay_within_their_token_budget_and_a_long_prompt_goes_alone() -> None:
    plan = DecodePlan(kv_tokens=100_000, prefill_tokens=1000, max_rows=16, max_length=8192)
    assert plan.prefill_groups([100, 200, 300, 400, 1500, 1600]) == [[0, 1, 2], [3], [4], [5]]


def test_memory_sizes_the_kv_pool_and_the_prefill_budget() -> None:
    kv = KVShape.of(QWEN2_0_5B, dtype_bytes=2)
    plan = memory_plan(100 * GIB, 0.9, kv, prefill_bytes_per_token=200_000, max_rows=256, max_length=32768)
    usable = 100 * GIB * 0.9 - GRAPH_RESERVE_BYTES
    assert plan.kv_tokens == int(usable * 0.75 / 12_288)
    assert plan.prefill_tokens == int(usable * 0.25 / (200_000 * 1.5))
    assert plan.max_rows == 256
    # A batch of 640x480 captions (2,952 prompt tokens, 60 new): 256 rows of 3,072 fit in ~5.6 M tokens.
    assert plan.fits([2952] * 256, new_tokens=60)


def test_too_little_memory_is_refused_with_what_to_do() -> None:
    kv = KVShape.of(QWEN2_0_5B, dtype_bytes=2)
    with pytest.raises(ValueError, match="Hint: free the GPU, raise --gpu-memory-utilization"):
        memory_plan(int(2.5 * GIB), 0.9, kv, prefill_bytes_per_token=200_000, max_rows=8, max_length=32768)
