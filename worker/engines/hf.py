"""The transformers engine: the model card's own code path, on dynamic micro-batches.

Preprocessing (chat template, tokenizer, image/video processor) happens before `add`, in the preprocessing
processes (`ProcessorPreparation`); the batcher stacks jobs with equal batch keys, as many as the device's memory
holds for their prompt lengths. Two threads share the batch work:
the batcher's thread forms a batch and stages it (collates it; on CUDA, copies its inputs to the device on a side
stream) while the runner thread runs the previous one, so the next batch's inputs travel while the current one
decodes. Greedy batches decode on a static cache, each step a CUDA graph captured at start-up
(worker/engines/hf_static.py); sampling ones, and everything when `--no-cuda-graphs`, in transformers' `generate`.
A watchdog restarts the process when a batch runs past `VLMQ_BATCH_TIMEOUT_S` (a hung device).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

from worker.batcher import Batcher, Incoming
from worker.engines.base import Generated, Prepare
from worker.engines.decode_plan import DecodePlan, KVShape, memory_plan
from worker.engines.hf_model import Prepared, ProcessorPreparation, Staged, VisionLanguageModel
from worker.engines.hf_static import StaticDecoder
from worker.errors import DeviceFailed
from worker.hooks import Hooks
from worker.metrics import Metrics
from worker.settings import WorkerSettings
from worker.watchdog import Watchdog, exit_for_restart

log = logging.getLogger(__name__)

CPU_MAX_BATCH = 8
GPU_MAX_BATCH = 256  # the most rows one static decode takes; memory usually allows more for short prompts
CPU_CACHE_TOKENS_PER_ROW = 4096
Outcomes = Sequence[Generated | BaseException]


class HFEngine:
    """`VisionLanguageModel` behind the batcher, its runner thread and the watchdog (see `worker.engines.base`)."""

    def __init__(
        self,
        model: VisionLanguageModel,
        settings: WorkerSettings,
        metrics: Metrics,
        plan: DecodePlan | None = None,
        incoming: Incoming | None = None,
    ) -> None:
        self.model = model
        self.name = model.name
        self.prepare: Prepare | None = model.prepare
        self.metrics = metrics
        self.plan = plan
        self.max_batch_size = plan.max_rows if plan is not None else settings.max_batch_size or CPU_MAX_BATCH
        self.watchdog = Watchdog(settings.batch_timeout_s, exit_for_restart)
        self.batcher: Batcher[Prepared, Generated] = Batcher(
            self._hand_over,
            max_batch_size=self.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            fits=self._fits if plan is not None else None,
            incoming=incoming,
        )
        self._runs: queue.SimpleQueue[tuple[list[Prepared], Staged | None, Future[Outcomes], threading.Event] | None]
        self._runs = queue.SimpleQueue()
        self._runner = threading.Thread(target=self._serve_runs, name="vlmq-runner", daemon=True)

    @classmethod
    def preparation(cls, settings: WorkerSettings) -> ProcessorPreparation:
        return ProcessorPreparation(settings.model)

    @classmethod
    def start(
        cls,
        settings: WorkerSettings,
        metrics: Metrics,
        hooks: Hooks,
        incoming: Incoming | None = None,
    ) -> HFEngine:
        """Load the model (once per process), size its batches, build its decode graphs, then start its threads."""
        started = time.perf_counter()
        model = VisionLanguageModel.load(
            settings.model,
            settings.device,
            settings.torch_threads,
            dtype=settings.dtype,
            quantization=settings.quantization,
            attn_implementation=settings.attn_implementation,
        )
        model.hooks = hooks
        static = static_decoding(model, settings)
        plan = batch_plan(model, settings, static)
        if plan is not None and static:
            model.decoder = StaticDecoder(
                model.model,
                plan,
                model.pad_token_id,
                graphs=settings.cuda_graphs,
                built=metrics.decode_compilations.inc,
                stepped=metrics.decoded,
            )
            model.decoder.build()
        metrics.model_load_seconds.set(time.perf_counter() - started)
        metrics.watch_gpu_memory(model.memory_allocated)
        engine = cls(model, settings, metrics, plan, incoming)
        engine.batcher.start()
        engine._runner.start()
        engine.watchdog.start()
        return engine

    def add(self, job_id: str, request: Prepared) -> Future[Generated]:
        return self.batcher.submit(request, request.batch_key(job_id))

    def probe(self) -> None:
        self.model.probe()

    def busy_for(self) -> float | None:
        return self.watchdog.age()

    def close(self) -> None:
        self.batcher.close()  # runs what is queued, handing each batch to the runner
        self._runs.put(None)
        self._runner.join()
        self.watchdog.stop()

    def _fits(self, items: list[Prepared]) -> bool:
        assert self.plan is not None
        lengths = [item.num_tokens for item in items]
        if self.model.decoder is None:  # generate() prefills the whole batch at once
            return self.plan.fits(lengths, items[0].generation.max_new_tokens) and (
                len(items) * max(lengths) <= self.plan.prefill_tokens
            )
        return self.plan.fits(lengths, items[0].generation.max_new_tokens)

    # -- batcher thread: stage a batch, hand it to the runner -----------------------------------------------------
    def _hand_over(self, items: list[Prepared]) -> Future[Outcomes]:
        """Stage `items` while the runner runs the previous batch; return once the runner has taken them, so the
        next batch is formed from what arrived meanwhile."""
        staged = None
        try:
            staged = self.model.stage(items)
        except Exception:  # the runner stages again item by item (generate_safely), confining the failure
            log.exception("staging a batch of %d failed", len(items))
        outcomes: Future[Outcomes] = Future()
        taken = threading.Event()
        self._runs.put((items, staged, outcomes, taken))
        taken.wait()
        return outcomes

    # -- runner thread ----------------------------------------------------------------------------------------------
    def _serve_runs(self) -> None:
        while (run := self._runs.get()) is not None:
            items, staged, outcomes, taken = run
            taken.set()
            try:
                outcomes.set_result(self._run_batch(items, staged))
            except BaseException as exc:
                outcomes.set_exception(exc)

    def _run_batch(self, items: list[Prepared], staged: Staged | None) -> Outcomes:
        started = time.perf_counter()
        self.watchdog.begin()
        try:
            outcomes = self.model.generate_safely(items, staged)
        except DeviceFailed as exc:
            exit_for_restart(f"the device failed ({exc}); nothing more can run on it in this process")
            raise
        finally:
            self.watchdog.end()
        self.metrics.batch(len(items), time.perf_counter() - started)
        done = [o for o in outcomes if isinstance(o, Generated)]
        self.metrics.generated(sum(g.tokens for g in done), sum(g.decode_slots for g in done))
        return outcomes


def static_decoding(model: VisionLanguageModel, settings: WorkerSettings) -> bool:
    """Whether greedy jobs decode on the static cache (`VLMQ_DECODER`, `VLMQ_CUDA_GRAPHS`; see the settings)."""
    wanted = settings.decoder == "static" or (
        settings.decoder == "auto" and model.device.type == "cuda" and settings.cuda_graphs
    )
    if not wanted:
        return False
    why_not = "4-bit weights" if settings.quantization == "4bit" else StaticDecoder.supported(model.model)
    if why_not:
        log.warning("static decoding is off for this model (%s): greedy jobs decode with generate()", why_not)
        return False
    return True


def batch_plan(model: VisionLanguageModel, settings: WorkerSettings, static: bool) -> DecodePlan | None:
    """The shapes and budgets that size batches: from free device memory on CUDA, from the settings with the static
    decoder on CPU; None when batches are plain `max_batch_size` (CPU, `generate`)."""
    text = model.model.config.text_config
    max_length = settings.max_model_len or int(getattr(text, "max_position_embeddings", 32768))
    if model.device.type != "cuda":
        if not static:
            return None
        rows = settings.max_batch_size or CPU_MAX_BATCH
        return DecodePlan(
            kv_tokens=settings.kv_cache_tokens or rows * CPU_CACHE_TOKENS_PER_ROW,
            prefill_tokens=settings.prefill_tokens or 1 << 40,
            max_rows=rows,
            max_length=max_length,
        )
    import torch

    kv = KVShape.of(text, torch.finfo(model.dtype).bits // 8)
    per_token = measure_prefill_bytes(model)
    free, _ = torch.cuda.mem_get_info(model.device)
    plan = memory_plan(free, settings.gpu_memory_utilization, kv, per_token, settings.max_batch_size or GPU_MAX_BATCH,
                       max_length)  # fmt: skip
    if settings.kv_cache_tokens or settings.prefill_tokens:
        plan = DecodePlan(
            kv_tokens=settings.kv_cache_tokens or plan.kv_tokens,
            prefill_tokens=settings.prefill_tokens or plan.prefill_tokens,
            max_rows=plan.max_rows,
            max_length=plan.max_length,
        )
    log.info(
        "batches sized from memory: %.1f GiB free after loading, %d KV bytes per token, %.0f prefill bytes per prompt "
        "token (measured: the larger of an image's and a video's) -> KV pool %d tokens, prefill calls up to %d "
        "tokens, at most %d jobs per batch",
        free / 1024**3, kv.bytes_per_token, per_token, plan.kv_tokens, plan.prefill_tokens, plan.max_rows,
    )  # fmt: skip
    return plan


def prefill_probes(model: VisionLanguageModel) -> list[Prepared]:
    """The jobs whose prefill sets the activation budget: a 640x480 image (its anyres crops) and 8 frames of 640x480
    video. A video frame sends 729 vision patches through the vision tower for 196 prompt tokens, an image ~1.2
    patches per prompt token, so per prompt token a video prefill needs about 3x an image's activations."""
    import numpy as np
    from PIL import Image

    from producer.core.jobs import Generation, Job

    image = Image.fromarray(np.full((480, 640, 3), 127, dtype=np.uint8))
    frames = np.full((8, 480, 640, 3), 127, dtype=np.uint8)
    one = Generation(max_new_tokens=1)
    return [
        model.prepare(Job(task="caption", media=["s3://warm-up/640x480.jpg"]).conversation(), [image], [], one),
        model.prepare(Job(task="caption", media=["s3://warm-up/640x480.mp4"]).conversation(), [], [frames], one),
    ]


def measure_prefill_bytes(model: VisionLanguageModel) -> float:
    """Peak activation bytes per prompt token of one prefill (CUDA): the larger of the probes' (`prefill_probes`)."""
    import torch

    per_token = []
    for prepared in prefill_probes(model):
        inputs = model.on_device(model.collate([prepared]))
        torch.cuda.synchronize(model.device)
        before = torch.cuda.memory_allocated(model.device)
        torch.cuda.reset_peak_memory_stats(model.device)
        with torch.inference_mode():
            model.model(**inputs, use_cache=True, logits_to_keep=1)
        peak = torch.cuda.max_memory_allocated(model.device)
        del inputs
        torch.cuda.empty_cache()
        per_token.append(max(peak - before, 1) / prepared.num_tokens)
    return max(per_token)
