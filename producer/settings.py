"""The producer's settings: `ClientSettings`, every field shared with workers (`producer.core.settings`)."""

from __future__ import annotations

from producer.core.settings import SharedSettings

__all__ = ["ClientSettings", "SharedSettings"]


class ClientSettings(SharedSettings):
    """What a producer needs: the queue, the result backend and the results bucket (every field is shared with
    workers; the class stays the producer's public name)."""
