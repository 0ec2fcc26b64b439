"""Loading a LLaVA-OneVision checkpoint for the hf engine as its model card does, and the checks before it.

Refuses, before any weights are read, the settings that cannot work on this machine (a missing package, a device or
dtype that cannot run them), each with how to fix it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from worker.errors import ConfigError

# float16 on CPU runs and, on the tiny model, returned float32's text (6 of 6 image jobs, 32 tokens; 1.1x its time).
# It is slow for prefill-sized products: on an AMD EPYC with AVX512-BF16 but no AVX512-FP16, one thread, a
# 256x896 @ 896x4864 product took 3.8-4.9x float32's time in two runs (bfloat16: 0.3-0.75x; one-row decode products
# were faster in float16: memory-bound).
CPU_FLOAT16_WARNING = (
    "--dtype float16 on CPU: it runs, but PyTorch's CPU matrix products are several times slower in float16 than "
    "in float32 on CPUs without AVX512-FP16 (float16 is the model card's choice for GPUs). "
    "Hint: on CPU use --dtype auto (float32) or bfloat16"
)


def device_failed(exc: BaseException) -> bool:
    """Whether an error leaves the device unusable (CUDA errors are sticky: every later call fails too)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, torch.AcceleratorError):
        return True
    return isinstance(exc, RuntimeError) and any(
        marker in str(exc) for marker in ("CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error")
    )


def resolve_device(device: str) -> tuple[torch.device, torch.dtype]:
    """`auto` -> CUDA with bf16 when a GPU is present, else CPU with fp32 (the device and its default dtype)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for but CUDA is not available. Hint: --device cpu")
        return torch.device(device), torch.bfloat16
    return torch.device("cpu"), torch.float32


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> the device's default (bf16 on CUDA, fp32 on CPU); else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def check_load_options(device: torch.device, dtype: torch.dtype, quantization: str, attn_implementation: str) -> None:
    """Refuse settings that cannot work here before any weights are read, each with how to fix it.

    Raises:
        ConfigError: a package the settings need is missing, or the device or dtype cannot run them.
    """
    if quantization == "4bit":
        missing = [name for name in ("bitsandbytes", "accelerate") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                f"--quantization 4bit (VLMQ_QUANTIZATION=4bit) loads the weights with bitsandbytes, and "
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed. "
                "Hint: pip install 'vlmq[4bit]', or run unquantized with --quantization none"
            )
    if attn_implementation == "flash_attention_2":
        hint = "Hint: or use --attn-implementation sdpa (PyTorch's fused attention, the default)"
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "--attn-implementation flash_attention_2 (VLMQ_ATTN_IMPLEMENTATION) needs the flash-attn package, "
                "which is not installed. flash-attn has no wheel on PyPI: `pip install flash-attn "
                f"--no-build-isolation` compiles it on a CUDA machine and needs the CUDA toolkit (nvcc). {hint}"
            )
        if device.type != "cuda":
            raise ConfigError(
                "--attn-implementation flash_attention_2 runs only on CUDA, and this worker's device is "
                f"{device}. {hint}"
            )
        if dtype == torch.float32:
            raise ConfigError(
                "--attn-implementation flash_attention_2 runs in float16 or bfloat16 only, not float32. "
                f"Hint: --dtype bfloat16 (or auto), {hint[6:]}"
            )


def from_pretrained(
    model_id: str, device: torch.device, dtype: torch.dtype, quantization: str, attn_implementation: str
) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    if quantization != "4bit":
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            model_id, dtype=dtype, low_cpu_mem_usage=True, attn_implementation=attn_implementation
        )
        return model.to(device).eval()  # type: ignore[arg-type]
    from transformers import BitsAndBytesConfig

    # As the model card's 4-bit example, with NF4 and the compute dtype named. bitsandbytes places the quantized
    # weights while loading (device_map); a quantized model must not be moved with `.to()` afterwards.
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # a device map names one device, with its index
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        model_id,
        dtype=dtype,
        quantization_config=config,
        device_map={"": device},
        attn_implementation=attn_implementation,
    )
    if device.type == "cpu":
        _unpacked_on_cpu(model)
    return model.eval()


def _unpacked_on_cpu(model: Any) -> None:
    """Keep bitsandbytes off its CPU repacking for layers whose input width is not a multiple of its block size.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weights at its first forward pass
    (`_convert_weight_packed_for_cpu`), reshaping the block scales to (out, in // blocksize): for an input width
    that is not a multiple of the block size (64) that reshape fails ("shape '[32, 0]' is invalid", seen with the
    tiny model's 32-wide vision tower; SigLIP-so400m's fc2, 4,304 inputs, is not a multiple of 64 either). Those
    layers take bitsandbytes' generic path (dequantize, then matmul) instead; they stay 4-bit.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit) and module.in_features % getattr(module.weight, "blocksize", 64):
            module.support_avx512bf16_for_cpu = False
