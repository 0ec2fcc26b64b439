"""Batch webhooks: a POST of the batch's end, signed with HMAC-SHA256 over the body using `VLMQ_WEBHOOK_SECRET`
(header `X-Vlmq-Signature: sha256=<hex>`), retried with backoff on errors and 5xx."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.request

log = logging.getLogger(__name__)


def signature(body: bytes, secret: str) -> str:
    """The `X-Vlmq-Signature` header value of a webhook body: `sha256=` + HMAC-SHA256(secret, body) in hex."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_webhook(url: str, body: bytes, secret: str | None, attempts: int = 5) -> bool:
    """POST `body` to `url`, retrying with backoff on errors and 5xx; returns whether it was delivered."""
    headers = {"Content-Type": "application/json", "User-Agent": "vlmq"}
    if secret:
        headers["X-Vlmq-Signature"] = signature(body, secret)
    else:
        log.warning("VLMQ_WEBHOOK_SECRET is not set: the webhook to %s is not signed", url)
    for attempt in range(attempts):
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status < 300:
                    return True
        except OSError as exc:  # HTTPError (4xx/5xx) and connection errors
            if getattr(exc, "code", 500) < 500:
                log.error("webhook %s refused the batch event (%s); not retrying", url, exc)
                return False
            log.warning("webhook %s failed (%s); attempt %d of %d", url, exc, attempt + 1, attempts)
        time.sleep(min(30, 2**attempt))
    return False
