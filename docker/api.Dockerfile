# syntax=docker/dockerfile:1
# `vlmq api`, the HTTP front door: FastAPI on uvicorn, producer side (no torch, no GPU). From the repository root:
#   docker build -f docker/api.Dockerfile -t vlmq-api .
#   docker run --rm -p 8000:8000 -e VLMQ_API_KEYS=... -e VLMQ_BROKER_URL=redis://... vlmq-api
# One process per container; scale with replicas behind a load balancer (a key's rate limit is per replica).
FROM python:3.12-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/vlmq
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
# DL3013: the project's own dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[api]" \
    && groupadd --system --gid 10001 vlmq \
    && useradd --system --uid 10001 --gid vlmq --no-create-home vlmq

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["vlmq"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
