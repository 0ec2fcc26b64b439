"""Start `vlmq api`: check the keys, then serve the app with uvicorn (one process; run more behind a load
balancer, or more replicas in Kubernetes, to scale)."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from producer.api.settings import ApiSettings

log = logging.getLogger(__name__)
LOCAL_HOST = "127.0.0.1"


class NoApiKeys(RuntimeError):
    """VLMQ_API_KEYS is empty and the local-only flag was not given."""


def serve(host: str, port: int, allow_no_auth_local: bool = False, settings: ApiSettings | None = None) -> None:
    """Serve the API until interrupted.

    Raises:
        NoApiKeys: no key is configured and `allow_no_auth_local` is False.
    """
    import uvicorn

    from producer.api.app import create_app

    settings = settings or ApiSettings()
    if not settings.api_keys:
        if not allow_no_auth_local:
            raise NoApiKeys(
                "VLMQ_API_KEYS is empty: set it to one or more keys (a JSON list, or comma-separated), or pass "
                "--allow-no-auth-local to serve without keys on 127.0.0.1 only"
            )
        if host != LOCAL_HOST:
            log.warning("no API keys: binding %s instead of %s", LOCAL_HOST, host)
        host = LOCAL_HOST
    log.info("vlmq api on http://%s:%d (%d keys; OpenAPI at /openapi.json)", host, port, len(settings.api_keys))
    # The access log would print query strings; it never sees headers, so keys stay out of it either way.
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False, proxy_headers=True)


def main(host: str, port: int, allow_no_auth_local: bool) -> int:
    """`vlmq api`: 0 after a clean shutdown, 2 when it cannot start (the message says why)."""
    try:
        serve(host, port, allow_no_auth_local=allow_no_auth_local)
    except NoApiKeys as exc:
        print(f"vlmq api: cannot start: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"vlmq api: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    return 0
