"""What the vLLM engine needs to start well, without vLLM: its CPU KV cache sized for the worker, and a failed start
reduced to its root cause (worker/engines/vllm_start.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from worker.engines.vllm_start import GiB, HeldOutput, kv_bytes_per_token, root_cause, size_kv_cache
from worker.errors import ConfigError

# The lines vLLM 0.32's CPU build printed when its worker could not get its KV cache (the test machine, abridged).
VLLM_FAILURE = """\
(VllmWorker-0 pid=8565) ERROR 12-04 13:07:48 [multiproc_executor.py:953] WorkerProc failed to start.
(VllmWorker-0 pid=8565) ERROR 12-04 13:07:48 [multiproc_executor.py:953] Traceback (most recent call last):
(VllmWorker-0 pid=8565) ERROR 12-04 13:07:48 [multiproc_executor.py:953]     raise ValueError(
(VllmWorker-0 pid=8565) ERROR 12-04 13:07:48 [multiproc_executor.py:953] ValueError: Available memory on node 0 \
(20.87/23.54 GiB) on startup is less than desired CPU memory utilization (0.9, 21.19 GiB).
(EngineCore pid=8550) ERROR 12-04 13:07:50 [core.py:1510] Exception: WorkerProc initialization failed due to an \
exception in a background process. See stack trace for root cause.
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root \
cause.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_kv_bytes_per_token_count_keys_and_values_of_every_layer() -> None:
    tiny = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=1, num_attention_heads=2, hidden_size=64)
    qwen2_0_5b = SimpleNamespace(num_hidden_layers=24, num_key_value_heads=2, num_attention_heads=14, hidden_size=896)

    assert kv_bytes_per_token(tiny, "float32") == 2 * 2 * 1 * 32 * 4 == 512
    assert kv_bytes_per_token(qwen2_0_5b, "bfloat16") == 2 * 24 * 2 * 64 * 2 == 12_288


def test_the_cache_holds_the_workers_sequences_at_full_length_when_they_fit() -> None:
    size = size_kv_cache(per_token=512, max_model_len=32_768, sequences=16, available=20 * GiB)

    assert (size.bytes, size.tokens) == (512 * 32_768 * 16, 32_768)
    assert size.describe() == (
        "0.25 GiB for 16 sequences of 32,768 tokens at 512 bytes per token, at most 25% of the 20.0 GiB available "
        "(VLLM_CPU_KVCACHE_SPACE=GiB overrides it)"
    )


def test_the_cache_is_capped_at_a_quarter_of_the_available_memory() -> None:
    size = size_kv_cache(per_token=24_576, max_model_len=32_768, sequences=16, available=20 * GiB)  # 12 GiB wanted

    assert size.bytes == 5 * GiB


def test_a_partial_block_is_rounded_up() -> None:
    assert size_kv_cache(per_token=100, max_model_len=1000, sequences=1, available=GiB).tokens == 1024


def test_not_even_one_sequence_in_the_share_stops_the_worker_saying_what_to_lower() -> None:
    with pytest.raises(ConfigError) as refused:
        size_kv_cache(per_token=24_576, max_model_len=32_768, sequences=1, available=2 * GiB)

    assert str(refused.value) == (
        "vLLM's KV cache for one sequence of max_model_len=32,768 tokens needs 0.75 GiB, more than 25% of the 2.0 GiB "
        "of memory available. Hint: lower --max-model-len (VLMQ_MAX_MODEL_LEN), free memory, or set "
        "VLLM_CPU_KVCACHE_SPACE (GiB) yourself"
    )


def test_the_root_cause_is_the_first_exception_that_is_not_one_of_vllms_wrappers() -> None:
    assert root_cause(VLLM_FAILURE) == (
        "ValueError: Available memory on node 0 (20.87/23.54 GiB) on startup is less than desired CPU memory "
        "utilization (0.9, 21.19 GiB)."
    )
    assert root_cause("RuntimeError: Engine core initialization failed. See root cause above.\n") is None


def test_held_output_of_this_process_and_its_children_goes_to_a_log_file_when_the_start_fails(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with HeldOutput() as held:
        subprocess.run(["sh", "-c", "echo child out; echo child err >&2"], check=True)
        os.write(1, b"parent out\n")  # what print() and logging write (pytest replaces sys.stdout here)
        text, log = held.failed()

    assert capfd.readouterr() == ("", "")  # nothing reached the terminal
    assert sorted(text.splitlines()) == ["child err", "child out", "parent out"]
    assert Path(log).read_text() == text


def test_held_output_is_written_out_once_released(capfd: pytest.CaptureFixture[str]) -> None:
    with HeldOutput() as held:
        os.write(1, b"while starting\n")
        held.release()
        os.write(1, b"after\n")

    assert capfd.readouterr().out == "while starting\nafter\n"
