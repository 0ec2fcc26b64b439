"""The model holder on the tiny checkpoint: loading, left padding, and batched == alone, in process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from producer.core.jobs import Generation, Job
from tests.reference import random_image, reference_text
from worker.devtools.tiny import is_tiny_model
from worker.engines.hf_load import resolve_device
from worker.engines.hf_model import VisionLanguageModel


@pytest.fixture(scope="module")
def vlm(tiny_model: Path) -> VisionLanguageModel:
    return VisionLanguageModel.load(str(tiny_model), "cpu")


def test_make_tiny_model_writes_a_small_real_llava_onevision_checkpoint(tiny_model: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_model)
    processor = AutoProcessor.from_pretrained(tiny_model)
    assert config.model_type == "llava_onevision"
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert processor.tokenizer.convert_ids_to_tokens([config.image_token_index, config.video_token_index]) == [
        "<image>",
        "<video>",
    ]
    assert "<|im_start|>" in processor.chat_template
    assert is_tiny_model(tiny_model)
    assert sum(f.stat().st_size for f in tiny_model.iterdir()) < 3 * 1024 * 1024


def test_auto_device_is_cpu_fp32_without_cuda() -> None:
    if torch.cuda.is_available():
        assert resolve_device("auto") == (torch.device("cuda"), torch.bfloat16)
    else:
        assert resolve_device("auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(RuntimeError, match="Hint: --device cpu"):
            resolve_device("cuda:0")


def test_batches_are_padded_on_the_left(vlm: VisionLanguageModel) -> None:
    generation = Generation(max_new_tokens=4)
    short = vlm.prepare(Job(task="qa", media=["s3://m/a.png"], question="Hi?").conversation(),
                        [random_image(32, 32, 1)], [], generation)  # fmt: skip
    long = vlm.prepare(Job(task="qa", media=["s3://m/a.png"], question="A much longer question " * 5).conversation(),
                       [random_image(32, 32, 1)], [], generation)  # fmt: skip
    batch = vlm.collate([short, long])
    pad = long.num_tokens - short.num_tokens
    assert pad > 0
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * short.num_tokens
    assert batch["input_ids"][0, :pad].tolist() == [vlm.pad_token_id] * pad


def test_a_batch_of_different_images_returns_each_jobs_text_alone(vlm: VisionLanguageModel, tiny_model: Path) -> None:
    sizes = [(32, 32), (640, 480), (90, 300), (1000, 150), (77, 77)]
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    questions = ["What is this?", "Describe it.", "How many?", "Where?", "Why?"]
    generation = Generation(max_new_tokens=10)
    prepared = [
        vlm.prepare(Job(task="qa", media=["s3://m/x.png"], question=q).conversation(), [img], [], generation)
        for img, q in zip(images, questions, strict=True)
    ]
    batched = vlm.generate(prepared)
    assert [g.batch_size for g in batched] == [5] * 5
    assert [g.text for g in batched] == [
        reference_text(tiny_model, [img], q, 10) for img, q in zip(images, questions, strict=True)
    ]


def test_an_item_that_fails_alone_gets_its_own_error_and_its_batch_mates_succeed(
    vlm: VisionLanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    generation = Generation(max_new_tokens=3)
    prepared = [
        vlm.prepare(Job(media=["s3://m/x.png"]).conversation(), [random_image(40, 40, seed=i)], [], generation)
        for i in range(4)
    ]
    poisoned = prepared[2]
    real_generate = vlm.generate

    def generate(items):
        if any(item is poisoned for item in items):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_generate(items)

    monkeypatch.setattr(vlm, "generate", generate)
    outcomes = vlm.generate_safely(prepared)
    assert [type(o).__name__ for o in outcomes] == ["Generated", "Generated", "OutOfMemory", "Generated"]
    assert [getattr(o, "batch_size", None) for o in outcomes] == [2, 2, None, 1]
