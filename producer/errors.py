"""Every error the producer side raises, in one place: catch `VlmqClientError` for all of them (the tree is drawn
in `producer.core.errors`, where all but `InvalidManifest` are defined).
"""

from producer.core.errors import (
    CannotStart,
    InvalidBatchName,
    MissingExtra,
    ResultTimeout,
    ResultWriteError,
    VlmqClientError,
)
from producer.manifest import InvalidManifest

__all__ = [
    "CannotStart",
    "InvalidBatchName",
    "InvalidManifest",
    "MissingExtra",
    "ResultTimeout",
    "ResultWriteError",
    "VlmqClientError",
]
