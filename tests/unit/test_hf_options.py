"""The model card's loading options on the hf engine (dtype, 4-bit weights, attention), on the tiny checkpoint.

Each job's text is compared with the model card's own call (chat template, processor, `generate`, decode) on the
same loaded model: the worker's path (prepare, collate, cast, generate) must not change what the model returns.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer.cli import build_parser
from producer.core.jobs import Generation, Job
from tests.reference import random_image
from worker.cli import child_flags, worker_overrides
from worker.engines.hf_load import CPU_FLOAT16_WARNING, resolve_dtype
from worker.engines.hf_model import VisionLanguageModel
from worker.errors import ConfigError
from worker.settings import WorkerSettings

QUESTIONS = ["What is this?", "Describe it in detail.", "How many?"]
SIZES = [(32, 32), (640, 480), (90, 300)]


def card_text(vlm: VisionLanguageModel, image: Image.Image, question: str, max_new_tokens: int) -> str:
    """The model card's call for one image job, on `vlm`'s model: inputs cast to the model's dtype as the card does
    (`.to(0, torch.float16)`), greedy `generate`, the new tokens decoded."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = vlm.processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = vlm.processor(images=image, text=prompt, return_tensors="pt").to(vlm.device, vlm.dtype)
    with torch.inference_mode():
        output = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return vlm.processor.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def worker_texts(vlm: VisionLanguageModel, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """The worker's texts for three image jobs run as one batch, and the card's text for each job alone."""
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    generation = Generation(max_new_tokens=max_new_tokens)
    prepared = [
        vlm.prepare(Job(task="qa", media=["s3://m/x.png"], question=q).conversation(), [image], [], generation)
        for image, q in zip(images, QUESTIONS, strict=True)
    ]
    batched = [g.text for g in vlm.generate(prepared)]
    alone = [card_text(vlm, image, q, max_new_tokens) for image, q in zip(images, QUESTIONS, strict=True)]
    return batched, alone


def linear_layers(model: Any) -> dict[str, str]:
    """Each linear layer's class, as module.Class."""
    return {
        name: f"{type(m).__module__}.{type(m).__name__}"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def test_4bit_on_cpu_loads_nf4_linear_layers_and_returns_the_model_cards_text(tiny_model: Path) -> None:
    vlm = VisionLanguageModel.load(str(tiny_model), "cpu", quantization="4bit")
    layers = linear_layers(vlm.model)
    assert layers.pop("lm_head") == "torch.nn.modules.linear.Linear"  # transformers keeps the output layer unquantized
    assert len(layers) > 10 and set(layers.values()) == {"bitsandbytes.nn.modules.Linear4bit"}
    quantized = [m for m in vlm.model.modules() if type(m).__name__ == "Linear4bit"]
    assert {m.weight.quant_state.quant_type for m in quantized} == {"nf4"}
    assert {m.weight.dtype for m in quantized} == {torch.uint8}  # two 4-bit values per byte
    assert vlm.dtype == torch.float32  # the compute dtype, not the packed weights' uint8
    batched, alone = worker_texts(vlm, max_new_tokens=12)
    assert batched == alone
    assert all(len(text) > 0 for text in batched)


def test_4bit_computes_in_the_dtype_asked_for(tiny_model: Path) -> None:
    vlm = VisionLanguageModel.load(str(tiny_model), "cpu", dtype="bfloat16", quantization="4bit")
    assert vlm.dtype == torch.bfloat16
    assert {m.compute_dtype for m in vlm.model.modules() if type(m).__name__ == "Linear4bit"} == {torch.bfloat16}
    batched, alone = worker_texts(vlm, max_new_tokens=8)
    assert batched == alone


@pytest.mark.slow  # imports transformers
def test_4bit_without_bitsandbytes_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError) as refused:
        VisionLanguageModel.load("/nonexistent/checkpoint", "cpu", quantization="4bit")  # never read
    assert str(refused.value) == (
        "--quantization 4bit (VLMQ_QUANTIZATION=4bit) loads the weights with bitsandbytes, and bitsandbytes is not "
        "installed. Hint: pip install 'vlmq[4bit]', or run unquantized with --quantization none"
    )


def test_flash_attention_2_without_the_package_is_refused_before_loading() -> None:
    assert "flash_attn" not in sys.modules
    with pytest.raises(ConfigError) as refused:
        VisionLanguageModel.load("/nonexistent/checkpoint", "cpu", attn_implementation="flash_attention_2")
    assert str(refused.value) == (
        "--attn-implementation flash_attention_2 (VLMQ_ATTN_IMPLEMENTATION) needs the flash-attn package, which is not "
        "installed. flash-attn has no wheel on PyPI: `pip install flash-attn --no-build-isolation` compiles it on a "
        "CUDA machine and needs the CUDA toolkit (nvcc). Hint: or use --attn-implementation sdpa (PyTorch's fused "
        "attention, the default)"
    )


def test_float16_on_cpu_is_accepted_with_a_warning_and_runs(tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.engines.hf_model"):
        vlm = VisionLanguageModel.load(str(tiny_model), "cpu", dtype="float16")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [CPU_FLOAT16_WARNING]
    assert {p.dtype for p in vlm.model.parameters()} == {torch.float16}
    batched, alone = worker_texts(vlm, max_new_tokens=12)
    assert batched == alone


def test_bfloat16_on_cpu_loads_bf16_parameters_without_a_warning(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.engines.hf_model"):
        vlm = VisionLanguageModel.load(str(tiny_model), "cpu", dtype="bfloat16")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert {p.dtype for p in vlm.model.parameters()} == {torch.bfloat16}
    assert vlm.dtype == torch.bfloat16
    batched, alone = worker_texts(vlm, max_new_tokens=8)
    assert batched == alone


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_cuda() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_worker_flags_set_the_engine_settings_and_are_passed_to_each_gpu_child() -> None:
    argv = ["worker", "--device", "cuda:1", "--engine", "hf", "--dtype", "float16", "--quantization", "4bit"]
    argv += ["--attn-implementation", "eager", "--gpu-memory-utilization", "0.5", "--max-model-len", "2048"]
    argv += ["--max-num-seqs", "32", "--enforce-eager", "--metrics-port", "9900"]
    overrides = worker_overrides(build_parser().parse_args(argv))
    assert overrides == {
        "device": "cuda:1",
        "engine": "hf",
        "dtype": "float16",
        "quantization": "4bit",
        "attn_implementation": "eager",
        "metrics_port": 9900,
        "gpu_memory_utilization": 0.5,
        "max_model_len": 2048,
        "max_num_seqs": 32,
        "enforce_eager": True,
    }
    settings = WorkerSettings(**overrides)
    assert (settings.dtype, settings.quantization, settings.enforce_eager) == ("float16", "4bit", True)
    assert child_flags(overrides) == [
        "--device=cuda:0",
        "--engine=hf",
        "--dtype=float16",
        "--quantization=4bit",
        "--attn-implementation=eager",
        "--gpu-memory-utilization=0.5",
        "--max-model-len=2048",
        "--max-num-seqs=32",
        "--enforce-eager",
    ]
    child = worker_overrides(build_parser().parse_args(["worker", *child_flags(overrides)]))
    assert child == {k: v for k, v in overrides.items() if k != "metrics_port"} | {"device": "cuda:0"}
    assert worker_overrides(build_parser().parse_args(["worker", "--no-enforce-eager"])) == {"enforce_eager": False}
    assert worker_overrides(build_parser().parse_args(["worker"])) == {}


def test_an_unknown_dtype_flag_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["worker", "--dtype", "float8"])
    assert exited.value.code == 2
    assert "argument --dtype: invalid choice: 'float8'" in capsys.readouterr().err
