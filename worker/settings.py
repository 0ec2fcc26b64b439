"""Worker settings: everything a `vlmq worker` process reads at start-up, as `VLMQ_` environment variables."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from producer.core.settings import SharedSettings

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
VideoContainer = Literal["mp4", "matroska", "avi"]
EngineName = Literal["auto", "hf", "vllm"]
Dtype = Literal["auto", "float16", "bfloat16", "float32"]
Quantization = Literal["none", "4bit"]
AttnImplementation = Literal["sdpa", "flash_attention_2", "eager"]
VIDEO_CONTAINERS: tuple[VideoContainer, ...] = ("mp4", "matroska", "avi")


def default_preprocess_workers(workers_on_host: int = 1) -> int:
    """Preprocessing processes per worker: its share of the cores it may use, less one for its engine's process."""
    return min(8, max(1, usable_cores() // workers_on_host - 1))


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may run on, capped by its cgroup's CPU quota (a container's CPU limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


class WorkerSettings(SharedSettings):
    """Settings of one worker process (one model, one device)."""

    model: str = Field(DEFAULT_MODEL, description="Hugging Face model id or local checkpoint path")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu or cuda:N")
    engine: EngineName = Field(
        "auto",
        description="what runs the model: hf (transformers, the model card's code), vllm (continuous batching; "
        "pip install 'vlmq[vllm]'), or auto: vllm when it is installed and CUDA is present, else hf",
    )
    dtype: Dtype = Field(
        "auto",
        description="weights and activations: auto (bfloat16 on CUDA, float32 on CPU), float16 (the model "
        "card's), bfloat16 or float32",
    )
    quantization: Quantization = Field(
        "none",
        description="4bit: bitsandbytes NF4 weights, as on the model card (pip install 'vlmq[4bit]'; vllm: CUDA only)",
    )
    attn_implementation: AttnImplementation = Field(
        "sdpa", description="hf engine attention: sdpa, eager, or flash_attention_2 (needs CUDA and flash-attn)"
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="share of the GPU's memory the engine may take: vllm, of all of it (weights, KV cache); hf, of "
        "what is free once the weights are loaded (KV cache, prefill activations)",
    )
    max_model_len: int | None = Field(
        None,
        ge=64,
        description="longest prompt plus answer, in tokens (hf: the longest static cache built; longer jobs decode "
        "with generate()); default the model's own",
    )
    max_num_seqs: int = Field(128, ge=1, le=4096, description="vllm engine: most requests running at once")
    enforce_eager: bool = Field(False, description="vllm engine: no CUDA graphs (less memory, slower decoding)")
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="most jobs in one model call; default 8 on CPU, and on CUDA (hf) as many as free memory holds "
        "for their prompt lengths, up to 256",
    )
    cuda_graphs: bool = Field(
        True,
        description="hf engine on CUDA: greedy jobs decode on a static KV cache with each step a captured CUDA graph "
        "(built at start-up); false: transformers' generate() on a dynamic cache",
    )
    decoder: Literal["auto", "static", "generate"] = Field(
        "auto",
        description="hf engine decode loop: static (the static cache, on CUDA graphs when VLMQ_CUDA_GRAPHS), generate "
        "(transformers' generate), or auto: static on CUDA with CUDA graphs on, else generate",
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=64,
        description="hf static decoding: KV cache slots in tokens (rows x cache length); default from free GPU memory, "
        "or max batch x 4096 on CPU",
    )
    prefill_tokens: int | None = Field(
        None,
        ge=64,
        description="hf static decoding: most prompt tokens (rows x longest prompt) in one prefill call; larger "
        "batches prefill in parts; default from free GPU memory, unbounded on CPU",
    )
    max_wait_ms: float = Field(50.0, ge=0, le=60_000, description="longest the oldest ready job waits for batch-mates")
    concurrency: int | None = Field(
        None, ge=1, le=1024, description="jobs in flight per worker (fetching, decoding, waiting); default 2 x batch"
    )
    preprocess_workers: int | None = Field(
        None,
        ge=0,
        le=256,
        description="processes that fetch, decode and prepare media beside the engine's process (0: in the engine's "
        "process, as task threads); default: the cores per worker minus one, at most 8",
    )
    allocator: Literal["auto", "tcmalloc", "glibc", "system"] = Field(
        "auto",
        description="memory allocator of the preprocessing processes: tcmalloc (libtcmalloc-minimal4), glibc with "
        "raised mmap/trim thresholds, auto (tcmalloc when installed, else glibc) or system (unchanged)",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch CPU threads per operation; default 1 with CUDA (task threads give the parallelism), "
        "torch's own default on CPU",
    )
    allow_local_files: bool = Field(False, description="allow file:// media (only for trusted producers)")
    allowed_buckets: list[str] = Field(default_factory=list, description="S3 buckets media may come from; empty = any")
    allow_http_media: bool = Field(
        False, description="allow https:// media; private, loopback and link-local addresses stay blocked"
    )
    allow_plain_http: bool = Field(False, description="with VLMQ_ALLOW_HTTP_MEDIA, also allow unencrypted http://")
    http_allowed_networks: list[str] = Field(
        default_factory=list,
        description="networks (CIDR) https media may come from although private, e.g. an internal media server",
    )
    http_timeout_s: float = Field(30.0, gt=0, le=600, description="connect and read timeout of one http(s) request")
    http_deadline_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="longest one whole http(s) download may take (DNS lookups, redirects, connects, TLS handshakes, "
        "response headers and body together); "
        "past it the job fails media_unavailable and is retried",
    )
    max_media_bytes: int = Field(64 * 1024 * 1024, ge=1, description="largest media object fetched, in bytes")
    max_image_pixels: int = Field(64_000_000, ge=1, description="largest decoded image (width x height)")
    max_media_per_job: int = Field(16, ge=1, le=64, description="most images and videos in one job")
    max_video_seconds: float = Field(3600.0, gt=0, description="longest video (its whole duration, not the window)")
    max_video_frames: int = Field(216_000, ge=1, description="most frames a video may declare (1 h at 60 fps)")
    max_video_pixels: int = Field(3840 * 2160, ge=1, description="largest video frame (width x height; 4K UHD)")
    video_containers: list[VideoContainer] = Field(
        default_factory=lambda: list(VIDEO_CONTAINERS),
        description="video containers opened, recognised by their first bytes: mp4 (also MOV, M4V, 3GP), "
        "matroska (also WebM), avi",
    )
    job_ttl_s: float | None = Field(None, gt=0, description="time to live of jobs that set no ttl_s; unset = none")
    max_retries: int = Field(5, ge=0, le=100, description="retries of a job after a transient error")
    max_crashes: int = Field(
        3, ge=1, le=100, description="a job running when its worker died this many times is dead-lettered"
    )
    retry_backoff_s: int = Field(2, ge=0, description="first retry delay; doubles per retry, with equal jitter")
    retry_backoff_max_s: int = Field(300, ge=0, description="cap on one retry delay")
    max_decode_s: float = Field(
        120.0, gt=0, description="longest decode of one video; a hung decoder fails the job and restarts the worker"
    )
    batch_timeout_s: float = Field(
        600.0, gt=0, description="longest model.generate() of one batch; past it the worker exits to be restarted"
    )
    liveness_stall_s: float = Field(
        300.0,
        gt=0,
        description="/livez fails once a batch has run this long (the model loop counts as stuck), or when messages "
        "wait and no job has started or ended for this long (the consumer counts as stuck)",
    )
    max_message_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest message body a worker decodes; a larger one fails invalid_job"
    )
    recover_interval_s: float = Field(
        30.0, gt=0, description="how often a worker looks for jobs whose message was lost (a worker died receiving it)"
    )
    metrics_port: int | None = Field(None, ge=1, le=65535, description="serve Prometheus /metrics here; unset = off")
    task_events: bool = Field(
        True,
        description="send Celery task events (received, started, succeeded, ...) for `celery events` and Flower; "
        "one Redis PUBLISH per state change",
    )
    faults: str | None = Field(
        None, description="fault injection for vlmq's own tests (JSON, see worker/devtools/faults.py)"
    )
    worker_name: str | None = Field(None, description="name reported in results; default hostname:pid")

    @field_validator("device")
    @classmethod
    def _device_shape(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"device {device!r} is not auto, cpu, cuda or cuda:N. Hint: --device cuda:0")
        return device

    @model_validator(mode="after")
    def _redelivery_after_retry_delays(self) -> WorkerSettings:
        # A retry waiting for its countdown is an unacknowledged message: a shorter visibility timeout would make
        # Redis deliver it a second time while the first copy waits.
        if self.visibility_timeout_s <= self.retry_backoff_max_s:
            raise ValueError(
                f"VLMQ_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must be longer than VLMQ_RETRY_BACKOFF_MAX_S "
                f"({self.retry_backoff_max_s}): a retry waiting for its delay would be delivered twice"
            )
        return self

    @property
    def preprocess_processes(self) -> int:
        """`preprocess_workers`, with its default resolved (the supervisor sets it per GPU worker)."""
        if self.preprocess_workers is not None:
            return self.preprocess_workers
        return default_preprocess_workers()

    @property
    def in_flight(self) -> int:
        """Jobs in flight before the engine is loaded (connection pools): the concurrency, or twice the batch."""
        return self.concurrency or 2 * (self.max_batch_size or 8)
