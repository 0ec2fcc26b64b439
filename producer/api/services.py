"""What the routes of `vlmq api` share (`Services`, kept on the app's state), and the bearer scheme they document.

Its own module so that the routers and the app that includes them import it, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from producer.api.media import Stager
from producer.api.settings import ApiSettings
from producer.api.submitter import Submitter
from producer.api.waiting import Waiter
from producer.client import Client


@dataclass
class Services:
    """What the routes share: settings, the producer client, the stager, the waiter and the submitter."""

    settings: ApiSettings
    client: Client
    stager: Stager
    waiter: Waiter
    submitter: Submitter


def services(request: Request) -> Services:
    shared: Services = request.app.state.services
    return shared


bearer = HTTPBearer(auto_error=False, description="a key from VLMQ_API_KEYS")  # documents it; the gate checks it
AUTH = [Depends(bearer)]
