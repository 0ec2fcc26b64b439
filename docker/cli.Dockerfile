# syntax=docker/dockerfile:1
# Producers and the CLI (`vlmq submit`, `result`, `dead-letters`, `retry-failed`, `exporter`): no torch, no GPU.
#   docker build -f docker/cli.Dockerfile -t vlmq-cli .
#   docker run --rm -e VLMQ_BROKER_URL=redis://... vlmq-cli submit s3://media/cat.jpg
FROM python:3.12-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/vlmq
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
# Flower, for `celery -A producer.celery_app flower` (compose's flower profile); `inspect` and `events` need only vlmq.
RUN pip install --no-cache-dir . "flower>=2.0.1,<3" \
    && groupadd --system --gid 10001 vlmq \
    && useradd --system --uid 10001 --gid vlmq --no-create-home vlmq

USER 10001:10001
ENTRYPOINT ["vlmq"]
CMD ["--help"]
