"""The transformers model holder: load LLaVA-OneVision once, prepare one job's inputs, generate for a batch of them.

Loading follows the model card (`LlavaOnevisionForConditionalGeneration` + `AutoProcessor`), so a Hugging Face id,
a local checkpoint, the HF cache and `HF_HUB_OFFLINE=1` all work as they do there.

`prepare` (chat template, tokenizer, image/video processor, one job at a time) runs in the preprocessing processes,
each with the checkpoint's processor alone (`ProcessorPreparation`), or in the task threads with
`--preprocess-workers 0`. `stage` and `run` take a batch of prepared jobs: they only stack the tensors (padded
exactly as the processor pads a batch: ids on the left, image crops with zeros) and run the static decode loop or
`model.generate`, so a batched job returns what the model card's code returns for that job alone.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from producer.core.jobs import Generation
from worker.engines.base import Generated, Prepare
from worker.engines.hf_load import (
    CPU_FLOAT16_WARNING,
    check_load_options,
    device_failed,
    from_pretrained,
    resolve_device,
    resolve_dtype,
)
from worker.engines.hf_static import StaticDecoder
from worker.errors import DeviceFailed, InferenceError, OutOfMemory, VlmqError
from worker.hooks import Hooks

log = logging.getLogger(__name__)

# Processor outputs that are stacked along the batch (first) dimension as they are.
_CONCAT_KEYS = ("image_sizes", "batch_num_images", "image_sizes_videos")


SHARED_MIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class ProcessorPreparation:
    """The hf engine's preparation (`worker.engines.base.Preparation`): the checkpoint's processor, without its
    weights, in each preprocessing process."""

    model: str

    def build(self) -> Prepare:
        return VisionLanguageModel.processor_only(self.model).prepare


@dataclass
class Staged:
    """A batch ready to `run`: the static decodes it splits into (item indices, their prefill calls' inputs) and the
    items `generate` runs instead (sampling jobs, or prompts longer than every static shape)."""

    items: Sequence[Prepared]
    decodes: list[tuple[list[int], list[dict[str, torch.Tensor]]]] = field(default_factory=list)
    rest: list[int] = field(default_factory=list)


@dataclass
class Prepared:
    """One job's model inputs (batch dimension 1), ready to be stacked with others."""

    inputs: dict[str, torch.Tensor]
    generation: Generation
    modality: tuple[Hashable, ...] = field(default=())

    @property
    def num_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def shared(self) -> Prepared:
        """Large tensors stay tensors, which cross processes in shared memory (one file descriptor each); small ones
        (token ids, masks, sizes) become numpy arrays, pickled inline: cheaper than a descriptor."""
        inputs: dict[str, Any] = {k: v.numpy() if v.nbytes < SHARED_MIN_BYTES else v for k, v in self.inputs.items()}
        self.inputs = inputs
        return self

    def restored(self) -> Prepared:
        """`shared` undone in the engine's process (no copies: `from_numpy` shares the memory)."""
        inputs: dict[str, Any] = self.inputs
        self.inputs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
        return self

    def batch_key(self, job_id: str) -> Hashable:
        """Jobs share a batch only with equal keys: same generation settings and same kinds of media.

        A seeded sampling job runs alone, so the same seed gives the same text whatever else is queued.
        """
        g = self.generation
        sampling = (g.temperature, g.top_p, g.seed) if g.temperature > 0 else ()
        alone = (job_id,) if g.temperature > 0 and g.seed is not None else ()
        return (self.modality, g.max_new_tokens, sampling, alone)


class VisionLanguageModel:
    """One loaded LLaVA-OneVision model and its processor, on one device."""

    def __init__(
        self, model: Any, processor: Any, *, name: str, device: torch.device, dtype: torch.dtype | None = None
    ) -> None:
        self.model = model
        self.processor = processor
        self.name = name
        self.device = device
        self.hooks = Hooks()
        self.decoder: StaticDecoder | None = None  # greedy jobs decode here when set (worker.engines.hf_static)
        # The dtype pixel values are cast to: the model's compute dtype. A 4-bit model's quantized weights are uint8
        # (bitsandbytes packs two NF4 values per byte), so its dtype is that of its floating-point parameters.
        self.dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
        # transformers pads on the right by default; batched generation needs left padding, or each shorter
        # prompt would be followed by pad tokens and its continuation would differ from the same prompt alone.
        processor.tokenizer.padding_side = "left"
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model is not None else None
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._local = threading.local()
        self.load_seconds = 0.0

    @classmethod
    def load(
        cls,
        model_id: str,
        device: str = "auto",
        torch_threads: int | None = None,
        dtype: str = "auto",
        quantization: str = "none",
        attn_implementation: str = "sdpa",
    ) -> VisionLanguageModel:
        """Load a checkpoint the way the model card does (id or local path; honours HF_HUB_OFFLINE).

        Args:
            model_id: Hugging Face id or local checkpoint directory.
            device: `auto`, `cpu`, `cuda` or `cuda:N`.
            torch_threads: torch's CPU threads per operation for this process; None: 1 with CUDA, else torch's
                default.
            dtype: `auto` (bfloat16 on CUDA, float32 on CPU), `float16`, `bfloat16` or `float32`.
            quantization: `none`, or `4bit`: bitsandbytes NF4 weights computing in `dtype`.
            attn_implementation: `sdpa`, `eager` or `flash_attention_2` (CUDA and the flash-attn package).

        Raises:
            ConfigError: the options cannot work here (checked before any weights are read).
        """
        from transformers import AutoProcessor

        started = time.perf_counter()
        torch_device, _ = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        check_load_options(torch_device, torch_dtype, quantization, attn_implementation)
        if torch_device.type == "cpu" and torch_dtype == torch.float16:
            log.warning(CPU_FLOAT16_WARNING)
        # Many task threads run the processor's torch ops at once; an intra-op pool per op on top of them only
        # oversubscribes the cores (its idle threads spin). Measured on CPU: 1 thread halves the processor's
        # CPU time for the same wall time (BENCHMARKS.md).
        threads = torch_threads or (1 if torch_device.type == "cuda" else None)
        if threads:
            torch.set_num_threads(threads)
        model = from_pretrained(model_id, torch_device, torch_dtype, quantization, attn_implementation)
        processor = AutoProcessor.from_pretrained(model_id)
        holder = cls(model, processor, name=model_id, device=torch_device, dtype=torch_dtype)
        holder.load_seconds = time.perf_counter() - started
        log.info(
            "loaded %s on %s (%s%s, %s attention) in %.1f s",
            model_id,
            torch_device,
            torch_dtype,
            ", 4-bit NF4 weights" if quantization == "4bit" else "",
            attn_implementation,
            holder.load_seconds,
        )
        return holder

    @classmethod
    def processor_only(cls, model_id: str) -> VisionLanguageModel:
        """The checkpoint's processor without its weights: `prepare` only (preprocessing processes, the no-op engine).

        `prepare` works on CPU tensors in float32 whatever the model's dtype and device: the batcher casts and moves
        them when it stacks a batch.
        """
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_id)
        return cls(None, processor, name=model_id, device=torch.device("cpu"), dtype=torch.float32)

    # -- task threads --------------------------------------------------------------------------------------------
    def _thread_processor(self) -> Any:
        # Hugging Face's Rust tokenizers refuse concurrent use of one instance ("Already borrowed"); each task
        # thread gets its own copy of the (small) processor.
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.processor)
        return processor

    def prepare(
        self,
        conversation: list[dict[str, Any]],
        images: Sequence[Image.Image],
        videos: Sequence[np.ndarray],
        generation: Generation,
    ) -> Prepared:
        """Render the chat template and run the processor for one job, as the model card does."""
        processor = self._thread_processor()
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        try:
            inputs = processor(
                images=list(images) or None, videos=list(videos) or None, text=prompt, return_tensors="pt"
            )
        except VlmqError:
            raise
        except Exception as exc:
            raise InferenceError(f"the processor could not prepare this job's inputs: {exc}") from None
        frames = tuple(int(v.shape[0]) for v in videos)
        modality = ("image" if images else "", "video" if videos else "", frames)
        return Prepared(inputs=dict(inputs), generation=generation, modality=modality)

    # -- batcher thread ------------------------------------------------------------------------------------------
    def collate(self, items: Sequence[Prepared]) -> dict[str, torch.Tensor]:
        """Stack single-job inputs into one batch, padded the way the processor pads a batch."""
        longest = max(item.num_tokens for item in items)
        ids, mask = [], []
        for item in items:
            n = item.num_tokens
            pad = longest - n
            ids.append(
                torch.cat([torch.full((1, pad), self.pad_token_id, dtype=torch.long), item.inputs["input_ids"]], 1)
            )
            mask.append(torch.cat([torch.zeros((1, pad), dtype=torch.long), item.inputs["attention_mask"]], 1))
        batch: dict[str, torch.Tensor] = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask)}
        if "pixel_values" in items[0].inputs:
            # (images, crops, 3, H, W): images differ in crop count; pad crops with zeros like the image processor.
            values = [item.inputs["pixel_values"] for item in items]
            crops = max(v.shape[1] for v in values)
            batch["pixel_values"] = torch.cat(
                [torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, crops - v.shape[1])) for v in values]
            )
        if "pixel_values_videos" in items[0].inputs:
            batch["pixel_values_videos"] = torch.cat([item.inputs["pixel_values_videos"] for item in items])
        for key in _CONCAT_KEYS:
            if key in items[0].inputs:
                batch[key] = torch.cat([torch.as_tensor(item.inputs[key]) for item in items])
        return batch

    def stage(self, items: Sequence[Prepared]) -> Staged:
        """Collate a batch for `run` (its static decodes' inputs already on their way to the device)."""
        generation = items[0].generation
        if self.decoder is None or not self.decoder.takes(generation):
            return Staged(items, rest=list(range(len(items))))
        plan = self.decoder.plan
        lengths = [item.num_tokens for item in items]
        groups, outside = plan.decode_groups(lengths, generation.max_new_tokens)
        decodes = []
        for group in groups:
            calls = plan.prefill_groups([lengths[i] for i in group])
            batches = [self.collate([items[group[j]] for j in call]) for call in calls]
            decodes.append((group, self.decoder.stage(batches)))
        return Staged(items, decodes, rest=outside)

    def run(self, staged: Staged) -> list[Generated]:
        """Each staged item's text: static decodes where the batch has them, `generate` for the rest."""
        items = staged.items
        self.hooks.batch([item.num_tokens for item in items])
        done: dict[int, Generated] = {}
        new_tokens = items[0].generation.max_new_tokens
        for group, prefills in staged.decodes:
            assert self.decoder is not None
            rows = self.decoder.decode(prefills, new_tokens)
            lengths = [self._length(row) for row in rows]
            texts = self.processor.batch_decode(rows, skip_special_tokens=True)
            for i, text, n in zip(group, texts, lengths, strict=True):
                done[i] = Generated(text.strip(), len(group), items[i].num_tokens, n, decode_slots=max(lengths))
        if staged.rest:
            done.update(zip(staged.rest, self.generate([items[i] for i in staged.rest]), strict=True))
        return [done[i] for i in range(len(items))]

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated batch on the model's device, its pixel values in the model's dtype."""
        return {
            k: v.to(self.device, dtype=self.dtype) if k.startswith("pixel_values") else v.to(self.device)
            for k, v in batch.items()
        }

    def generate(self, items: Sequence[Prepared]) -> list[Generated]:
        """One `model.generate` call for items with equal batch keys; returns each item's text."""
        generation = items[0].generation
        inputs = self.on_device(self.collate(items))
        kwargs: dict[str, Any] = {"max_new_tokens": generation.max_new_tokens, "pad_token_id": self.pad_token_id}
        if generation.temperature > 0:
            kwargs.update(do_sample=True, temperature=generation.temperature, top_p=generation.top_p)
            if generation.seed is not None:
                torch.manual_seed(generation.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        steps = len(new_tokens[0])
        return [
            Generated(
                t.strip(), len(items), prompt_tokens=item.num_tokens, tokens=self._length(row), decode_slots=steps
            )
            for t, item, row in zip(texts, items, new_tokens, strict=True)
        ]

    def _length(self, new_tokens: list[int]) -> int:
        """Tokens a row generated: up to its first end-of-sequence token (the rest of its row is padding)."""
        return next((i + 1 for i, token in enumerate(new_tokens) if token in self.eos_ids), len(new_tokens))

    def generate_safely(
        self, items: Sequence[Prepared], staged: Staged | None = None
    ) -> list[Generated | BaseException]:
        """`run` (of `staged`, or of `items` staged now), but a failure is confined to the items that cause it.

        On CUDA out-of-memory (or any other error) the batch is split in halves and each half retried, the
        pattern of accelerate's find_executable_batch_size; an item that fails alone gets its own error.

        Raises:
            DeviceFailed: a CUDA error other than out-of-memory; the CUDA context is unusable from then on.
        """
        try:
            return list(self.run(staged or self.stage(items)))
        except torch.OutOfMemoryError:
            self._free_memory()
            if len(items) == 1:
                return [OutOfMemory("this job does not fit in device memory even alone; use smaller media")]
            log.warning("out of memory on a batch of %d; running it again in halves", len(items))
        except Exception as exc:
            if device_failed(exc):
                raise DeviceFailed(f"{type(exc).__name__}: {exc}") from exc
            if len(items) == 1:
                log.exception("generation failed")
                return [InferenceError(f"generation failed: {type(exc).__name__}: {exc}")]
        half = len(items) // 2
        return self.generate_safely(items[:half]) + self.generate_safely(items[half:])

    def probe(self) -> None:
        """A one-token forward pass through the language model: raises if the device is broken."""
        ids = torch.tensor([[self.pad_token_id]], device=self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_allocated(self) -> float:
        """Bytes of device memory torch holds for tensors (0 on CPU)."""
        return float(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda" else 0.0

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
