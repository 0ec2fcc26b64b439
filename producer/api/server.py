"""Start `vlmq api`: check the keys, then serve the app with uvicorn (one process; run more behind a load
balancer, or more replicas in Kubernetes, to scale)."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from producer.api.settings import ApiSettings
from producer.core.preflight import check_bucket
from producer.core.settings import invalid_settings, unreadable_setting
from producer.core.storage import make_s3_client
from producer.errors import CannotStart

log = logging.getLogger(__name__)
LOCAL_HOST = "127.0.0.1"


class NoApiKeys(RuntimeError):
    """VLMQ_API_KEYS is empty and the local-only flag was not given."""


def check_buckets(settings: ApiSettings) -> None:
    """The results and staging buckets exist. (Redis is not waited for: without it the API starts, answers 503 and
    /readyz says so until it is back.)

    Raises:
        CannotStart: one of them does not.
    """
    s3 = make_s3_client(settings)
    buckets = {settings.results_bucket: "VLMQ_RESULTS_BUCKET", settings.staging_bucket: "VLMQ_STAGING_BUCKET"}
    for bucket, variable in buckets.items():
        if bucket:
            check_bucket(s3, bucket, variable, settings.s3_endpoint_url)


def serve(host: str, port: int, allow_no_auth_local: bool = False, settings: ApiSettings | None = None) -> None:
    """Serve the API until interrupted.

    Raises:
        NoApiKeys: no key is configured and `allow_no_auth_local` is False.
        CannotStart: the results or the staging bucket does not exist.
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
    check_buckets(settings)
    log.info("vlmq api on http://%s:%d (%d keys; OpenAPI at /openapi.json)", host, port, len(settings.api_keys))
    # The access log would print query strings; it never sees headers, so keys stay out of it either way.
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False, proxy_headers=True)


def main(host: str, port: int, allow_no_auth_local: bool) -> int:
    """`vlmq api`: 0 after a clean shutdown, 2 when it cannot start (the message says why)."""
    try:
        serve(host, port, allow_no_auth_local=allow_no_auth_local)
    except (NoApiKeys, CannotStart) as exc:
        print(f"vlmq api: cannot start: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"vlmq api: {invalid_settings(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # a VLMQ_ variable that is not the JSON its list setting needs
        print(f"vlmq api: {unreadable_setting(exc)}", file=sys.stderr)
        return 2
    return 0
