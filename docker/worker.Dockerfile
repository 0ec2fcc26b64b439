# syntax=docker/dockerfile:1
# The GPU worker image. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t vlmq-worker .
#   docker build -f docker/worker.Dockerfile --build-arg BAKE_MODEL=1 -t vlmq-worker:baked .   # weights inside
# Without BAKE_MODEL the weights are downloaded at the first start into HF_HOME (/models/hf): mount a volume there.
#
# A -base image is enough: torch's wheels bring their own CUDA runtime and cuDNN, and the NVIDIA container toolkit
# mounts the driver. The default torch wheel (PyPI, torch 2.14) is built for CUDA 13.0, so hosts need a driver
# >= 580; the base image's NVIDIA_REQUIRE_CUDA makes an older driver fail at `docker run`, not at the first batch.
# For an older driver, build with a matching nvidia/cuda:12.x base and e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
FROM nvidia/cuda:13.0.1-base-ubuntu24.04

# decord's wheel bundles its own FFmpeg (libavcodec, libavformat in decord.libs) and needs only libstdc++, which the
# base has: no system FFmpeg. That wheel is x86_64 only (manylinux2010), so the image is linux/amd64.
# libtcmalloc-minimal4: the allocator `vlmq worker` gives its preprocessing processes (VLMQ_ALLOCATOR=auto picks it
# when installed; worker/allocator.py, BENCHMARKS.md "Allocator").
# DL3008: the pinned base tag fixes the Ubuntu release; apt version pins would break at every security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vlmq \
    && useradd --system --uid 10001 --gid vlmq --create-home --home-dir /home/vlmq vlmq \
    && mkdir -p /models/hf \
    && chown 10001:10001 /models/hf

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/hf

# torch first, in a layer of its own: it is most of the image and changes far less often than vlmq.
# DL3013: TORCH_SPEC pins torch (hadolint cannot see through the variable).
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=""
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH_SPEC

WORKDIR /opt/vlmq
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
# DL3013: the project's own dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[worker]"

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001

# BAKE_MODEL=1 puts the weights in the image: no download at start (run it with HF_HUB_OFFLINE=1). An empty named
# volume mounted on /models/hf (compose) is filled with the baked files the first time.
ARG BAKE_MODEL=0
ARG MODEL_ID=llava-hf/llava-onevision-qwen2-0.5b-ov-hf
RUN if [ "$BAKE_MODEL" = "1" ]; then \
        python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])" \
            "$MODEL_ID"; \
    fi

# HF_HUB_OFFLINE=1: load only from HF_HOME (baked or pre-populated cache), never contact the hub.
ENV VLMQ_MODEL=$MODEL_ID \
    VLMQ_ALLOCATOR=tcmalloc \
    HF_HUB_OFFLINE=0 \
    VLMQ_METRICS_PORT=9808
EXPOSE 9808

# /livez answers 200 while the model loads; start-period still covers a first download of the weights.
HEALTHCHECK --interval=30s --timeout=20s --start-period=10m --retries=3 \
    CMD ["sh", "-c", "vlmq health --port \"$VLMQ_METRICS_PORT\""]

ENTRYPOINT ["vlmq"]
CMD ["worker"]
