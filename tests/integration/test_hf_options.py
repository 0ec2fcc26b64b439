"""The hf engine's model card options through `vlmq worker` processes: 4-bit weights and float16 on CPU run jobs
with the model card's text; flash_attention_2 without its package stops the worker before it takes a job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from producer import Job
from producer.core.jobs import Generation
from tests.conftest import MEDIA_BUCKET, Stack
from tests.reference import encode, random_image

MAX_NEW_TOKENS = 12
SIZES = [(32, 32), (640, 480), (150, 600)]
QUESTION = "What is in the picture?"


def card_model(model_dir: Path, dtype: torch.dtype, four_bit: bool) -> tuple[Any, Any]:
    """The checkpoint loaded as the model card shows: `dtype`, and with `four_bit` NF4 weights via bitsandbytes."""
    from transformers import AutoProcessor, BitsAndBytesConfig, LlavaOnevisionForConditionalGeneration

    if not four_bit:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        return model, AutoProcessor.from_pretrained(model_dir)
    from worker.engines.hf_load import _unpacked_on_cpu

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quantization, device_map="cpu"
    ).eval()
    _unpacked_on_cpu(model)  # bitsandbytes 0.50's CPU repacking fails on the tiny model's 32-wide layers
    return model, AutoProcessor.from_pretrained(model_dir)


def card_text(model: Any, processor: Any, image: Image.Image, dtype: torch.dtype) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to("cpu", dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def image_jobs(stack: Stack, prefix: str) -> tuple[list[Job], list[Image.Image]]:
    s3 = stack.s3.client()
    images, jobs = [], []
    generation = Generation(max_new_tokens=MAX_NEW_TOKENS)
    for i, (w, h) in enumerate(SIZES):
        image = random_image(w, h, seed=i)
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"{prefix}/{i}.png", Body=encode(image, "PNG"))
        images.append(image)  # PNG is lossless: the worker decodes these pixels
        uri = f"s3://{MEDIA_BUCKET}/{prefix}/{i}.png"
        jobs.append(Job(task="qa", media=[uri], question=QUESTION, generation=generation))
    return jobs, images


def test_a_4bit_worker_returns_the_model_cards_text_of_the_same_4bit_model(stack: Stack) -> None:
    jobs, images = image_jobs(stack, "four-bit")
    worker = stack.start_worker("--quantization", "4bit", "--max-batch-size", "3", "--max-wait-ms", "300")

    results = stack.client().run(jobs, progress=False, timeout=300)

    assert [r.status for r in results] == ["succeeded"] * len(jobs)
    model, processor = card_model(stack.model, torch.float32, four_bit=True)
    assert [r.text for r in results] == [card_text(model, processor, image, torch.float32) for image in images]
    assert f"loaded {stack.model} on cpu (torch.float32, 4-bit NF4 weights, sdpa attention)" in worker.log_tail(200)


def test_a_float16_worker_on_cpu_warns_and_returns_the_model_cards_float16_text(stack: Stack) -> None:
    jobs, images = image_jobs(stack, "float16")
    worker = stack.start_worker("--dtype", "float16")

    results = stack.client().run(jobs, progress=False, timeout=300)

    assert [r.status for r in results] == ["succeeded"] * len(jobs)
    model, processor = card_model(stack.model, torch.float16, four_bit=False)
    assert [r.text for r in results] == [card_text(model, processor, image, torch.float16) for image in images]
    log = worker.log_tail(200)
    assert "WARNING worker.engines.hf_model: --dtype float16 on CPU: it runs, but PyTorch's CPU matrix" in log
    assert f"loaded {stack.model} on cpu (torch.float16, sdpa attention)" in log


def test_flash_attention_2_without_the_package_stops_the_worker_before_it_takes_a_job(stack: Stack) -> None:
    jobs, _ = image_jobs(stack, "flash")
    handle = stack.client().submit(jobs[0])  # waiting in the queue before the worker starts
    worker = stack.start_worker("--attn-implementation", "flash_attention_2", ready_count=0)

    assert worker.proc.wait(timeout=120) == 2
    log = worker.log_path.read_text()
    assert log.splitlines()[-1] == (
        "vlmq worker: cannot start: --attn-implementation flash_attention_2 (VLMQ_ATTN_IMPLEMENTATION) needs the "
        "flash-attn package, which is not installed. flash-attn has no wheel on PyPI: `pip install flash-attn "
        "--no-build-isolation` compiles it on a CUDA machine and needs the CUDA toolkit (nvcc). Hint: or use "
        "--attn-implementation sdpa (PyTorch's fused attention, the default)"
    )
    assert "Traceback" not in log and " ready." not in log
    stack.start_worker()  # the job was left in the queue for a worker that can run it
    assert handle.result(timeout=120).status == "succeeded"
