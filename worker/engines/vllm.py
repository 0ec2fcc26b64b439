"""The vLLM engine: continuous batching, paged KV cache, chunked prefill, prefix caching and (on GPU) CUDA graphs.

A job becomes a vLLM request as soon as its media are decoded: no batch timer. vLLM's scheduler decides what runs
together, step by step, so a short answer leaves the batch when it ends instead of padding to the longest one.

The prompt is the one the hf engine builds (the checkpoint's chat template over the job's conversation); images go
in as decoded images and videos as the frames vlmq sampled itself, so both engines see the same pixels (vLLM does not
resample a frames array). Each job's `max_new_tokens`, `temperature`, `top_p` and `seed` become its request's
sampling parameters, so a seeded job no longer needs to run alone. Texts are decoded from the generated token ids
with the checkpoint's own tokenizer, exactly as the hf engine decodes them.

vLLM's `AsyncLLM` runs the engine core in its own process and is driven here from one asyncio loop thread; task
threads hand it requests with `asyncio.run_coroutine_threadsafe`. If the engine core dies, every request raises
`EngineDeadError`: the worker exits with status 70 without acknowledging its jobs, as it does for a broken device.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from producer.core.jobs import Generation
from worker.batcher import Incoming
from worker.engines.base import Decoded, DecodedMedia, Generated, Prepare
from worker.engines.vllm_start import HeldOutput, KVCacheSize, cpu_kv_cache, root_cause
from worker.errors import ConfigError, InferenceError, PromptTooLong
from worker.hooks import Hooks
from worker.metrics import Metrics
from worker.settings import WorkerSettings
from worker.watchdog import Watchdog, exit_for_restart

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One job as vLLM takes it: the rendered prompt, its media, its sampling parameters."""

    prompt: str
    media: dict[str, Any]  # vLLM's multi_modal_data
    sampling: Any  # vllm.SamplingParams


def engine_args(settings: WorkerSettings, device_type: str, kv_cache: KVCacheSize | None = None) -> dict[str, Any]:
    """vLLM's engine arguments for these settings (`AsyncEngineArgs(**engine_args(...))`); `kv_cache`: its size on
    CPU (`worker.engines.vllm_start.cpu_kv_cache`)."""
    if settings.attn_implementation != "sdpa":
        raise ConfigError(
            f"--attn-implementation {settings.attn_implementation} applies to the hf engine only: vLLM picks its own "
            "attention kernels (FlashAttention on CUDA). Leave it unset with --engine vllm"
        )
    quantization = None
    if settings.quantization == "4bit":
        if device_type != "cuda":
            raise ConfigError(
                "--quantization 4bit on the vllm engine needs CUDA (vLLM's bitsandbytes); on CPU use "
                "--engine hf --quantization 4bit"
            )
        quantization = "bitsandbytes"
    return {
        "model": settings.model,
        "dtype": vllm_dtype(settings, device_type),
        "quantization": quantization,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "enforce_eager": settings.enforce_eager,
        "limit_mm_per_prompt": {"image": settings.max_media_per_job, "video": settings.max_media_per_job},
        "seed": 0,
        "disable_log_stats": True,  # vLLM's own loggers off; vlmq's below still receive the statistics
        "kv_cache_memory_bytes": kv_cache.bytes if kv_cache is not None else None,
    }


def vllm_dtype(settings: WorkerSettings, device_type: str) -> str:
    return settings.dtype if settings.dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")


def _start_failed(exc: Exception, output: str, log_path: str) -> ConfigError:
    """One line for a vLLM engine that did not start: its root cause, not its processes' tracebacks."""
    if isinstance(exc, ConfigError):
        return exc
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    cause = root_cause(output) if "root cause" in message or not message else None
    return ConfigError(
        f"the vLLM engine did not start: {cause or f'{type(exc).__name__}: {message}'} (vLLM's output: {log_path})"
    )


class VLLMEngine:
    """vLLM's `AsyncLLM` behind vlmq's engine interface (see `worker.engines.base.Engine`)."""

    prepare: Prepare | None = None  # vLLM's processor prepares in its front end, from the decoded media (`Decoded`)

    def __init__(self, settings: WorkerSettings, metrics: Metrics, hooks: Hooks) -> None:
        from transformers import AutoProcessor

        self.name = settings.model
        self.max_batch_size = settings.max_batch_size or 8  # in-flight default: twice it, as for the hf engine
        self.metrics = metrics
        self.hooks = hooks
        self.watchdog = Watchdog(settings.batch_timeout_s, exit_for_restart)
        self.processor = AutoProcessor.from_pretrained(settings.model)
        self._tokenizer_lock = threading.Lock()
        self._in_flight = 0
        self._peaks: dict[str, int] = {}  # per request in the engine: the most requests run in one step since
        self._stopped = threading.Event()
        self._count_lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vlmq-vllm", daemon=True)
        self.llm: Any = None

    @classmethod
    def preparation(cls, settings: WorkerSettings) -> DecodedMedia:
        return DecodedMedia()

    @classmethod
    def start(
        cls,
        settings: WorkerSettings,
        metrics: Metrics,
        hooks: Hooks,
        incoming: Incoming | None = None,
    ) -> VLLMEngine:
        """Start vLLM's engine core (its own process) and the loop thread that drives it."""
        try:
            import vllm  # noqa: F401  (a clear error before anything else is loaded)
        except ImportError:
            raise ConfigError(
                "--engine vllm needs vLLM: pip install -e '.[vllm]' in vlmq's checkout (or --engine hf)"
            ) from None
        started = time.perf_counter()
        engine = cls(settings, metrics, hooks)
        engine._thread.start()
        log.info("starting vLLM's engine for %s; its output follows once it has started", settings.model)
        with HeldOutput() as output:
            try:
                engine.llm = asyncio.run_coroutine_threadsafe(engine._create(settings), engine.loop).result()
            except Exception as exc:
                engine.loop.call_soon_threadsafe(engine.loop.stop)
                raise _start_failed(exc, *output.failed()) from exc
            output.release()
        metrics.model_load_seconds.set(time.perf_counter() - started)
        engine.watchdog.start()
        threading.Thread(target=engine._watch_engine_core, name="vlmq-vllm-alive", daemon=True).start()
        log.info("vLLM engine ready for %s in %.1f s", settings.model, time.perf_counter() - started)
        return engine

    async def _create(self, settings: WorkerSettings) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        device_type = current_platform.device_type
        kv_cache = cpu_kv_cache(settings, vllm_dtype(settings, device_type)) if device_type == "cpu" else None
        if kv_cache is not None:
            log.info("vLLM's KV cache: %s", kv_cache.describe())
        args = AsyncEngineArgs(**engine_args(settings, device_type, kv_cache))
        return AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger])

    def _stat_logger(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from worker.engines.vllm_stats import StatsToMetrics

        return StatsToMetrics(vllm_config, engine_index, self.metrics, self._progressed)

    def _progressed(self, running: int) -> None:
        """The engine finished a step. A hung engine is one that stops stepping with requests in flight."""
        for request_id, peak in self._peaks.items():  # this runs on the loop thread, as _generate does
            self._peaks[request_id] = max(peak, running)
        with self._count_lock:
            if self._in_flight:
                self.watchdog.begin()

    def _request(
        self,
        conversation: list[dict[str, Any]],
        images: Sequence[Image.Image],
        videos: Sequence[np.ndarray],
        generation: Generation,
    ) -> Request:
        from vllm import SamplingParams

        with self._tokenizer_lock:  # Rust tokenizers refuse concurrent use of one instance
            prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        # One item of a kind goes in bare, not in a list: vLLM 0.32 gives a list of one video an extra leading
        # dimension in LLaVA-OneVision's embeddings, and its engine core dies asserting on the shape.
        media: dict[str, Any] = {}
        if images:
            media["image"] = images[0] if len(images) == 1 else list(images)
        if videos:
            media["video"] = videos[0] if len(videos) == 1 else list(videos)
        greedy = generation.temperature == 0
        sampling = SamplingParams(
            max_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            top_p=1.0 if greedy else generation.top_p,
            seed=None if greedy else generation.seed,
            detokenize=False,  # decoded below with the checkpoint's tokenizer, as the hf engine decodes
        )
        return Request(prompt=prompt, media=media, sampling=sampling)

    def add(self, job_id: str, decoded: Decoded) -> Future[Generated]:
        request = self._request(decoded.conversation, decoded.images, decoded.videos, decoded.generation)
        with self._count_lock:
            if self._in_flight == 0:
                self.watchdog.begin()
            self._in_flight += 1
        return asyncio.run_coroutine_threadsafe(self._generate(job_id, request), self.loop)

    async def _generate(self, job_id: str, request: Request) -> Generated:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        final = None
        request_id = f"{job_id}-{uuid.uuid4().hex[:8]}"
        self._peaks[request_id] = 1
        try:
            self.hooks.request(request.prompt, self._kill_engine_core_soon)
            inputs = {"prompt": request.prompt, "multi_modal_data": request.media}
            async for output in self.llm.generate(inputs, request.sampling, request_id):
                final = output
        except EngineDeadError as exc:
            exit_for_restart(f"the vLLM engine died ({exc}); nothing more can run in this process")
            raise
        except VLLMValidationError as exc:
            raise PromptTooLong.from_vllm(str(exc)) from None
        except ValueError as exc:  # vLLM's processor call failed on this job's inputs
            raise InferenceError(f"the processor could not prepare this job's inputs: {exc}") from None
        finally:
            self._done()
            batch_size = self._peaks.pop(request_id)
        assert final is not None and final.finished
        ids = list(final.outputs[0].token_ids)
        self.metrics.generated(len(ids), len(ids))  # continuous batching decodes no padding
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        prompt_tokens = len(final.prompt_token_ids or ())
        # batch_size: the most requests that ran in one engine step while this one was in the engine
        return Generated(text, batch_size, prompt_tokens=prompt_tokens, tokens=len(ids), decode_slots=len(ids))

    def _done(self) -> None:
        with self._count_lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.watchdog.end()

    def _kill_engine_core_soon(self) -> None:
        self.loop.call_later(0.2, self._kill_engine_core)  # while its request runs

    def _kill_engine_core(self) -> None:
        """Fault injection (`kill_engine_on`): the engine core process dies, as on a CUDA crash inside it."""
        import psutil

        for child in psutil.Process().children(recursive=True):
            if child.name().startswith("VLLM::EngineCor"):
                child.kill()

    def _watch_engine_core(self) -> None:
        """Exit (70) as soon as vLLM marks its engine core dead, even with no request waiting to be told: a request
        added in the moment of the death can wait for ever (seen with vLLM 0.32: its renderer is shut down)."""
        while not self._stopped.wait(0.5):
            if self.llm.errored:
                exit_for_restart("the vLLM engine died (its engine core process ended); nothing more can run here")
                return

    def probe(self) -> None:
        asyncio.run_coroutine_threadsafe(self.llm.check_health(), self.loop).result(timeout=30)

    def busy_for(self) -> float | None:
        return self.watchdog.age()

    def close(self) -> None:
        """Requests already added finish (the task threads wait for them before a warm shutdown ends)."""
        self.watchdog.stop()
        self._stopped.set()
        deadline = time.monotonic() + 60
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.llm is not None:
            self.llm.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
