"""`vlmq api`: the HTTP front door (FastAPI on uvicorn). Producer side: imports neither torch nor the worker.

Native routes (`/jobs`, `/media`, `/manifests`, `/batches`), OpenAI-compatible routes under `/v1`, operations
routes (`/healthz`, `/readyz`, `/metrics`), and the OpenAPI description at `/openapi.json` (browse it at `/docs`).
Needs the `api` extra: `pip install 'vlmq[api]'`.
"""

from producer.api.server import serve
from producer.api.settings import ApiSettings

__all__ = ["ApiSettings", "create_app", "serve"]


def create_app(*args, **kwargs):
    """The ASGI app (see `producer.api.app.create_app`)."""
    from producer.api.app import create_app as build

    return build(*args, **kwargs)
