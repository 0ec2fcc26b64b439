"""Every Redis key vlmq writes comes from `producer/core/keys.py`: today's names by default, moved by a namespace."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer.core.batches import BatchStore
from producer.core.keys import Keys
from producer.core.ledger import Ledger
from producer.settings import ClientSettings


def every_key(keys: Keys) -> list[str]:
    return [
        keys.deliveries("j1"),
        keys.done("j1"),
        keys.receipts("j1"),
        keys.seen("j1"),
        keys.claim("j1"),
        keys.dead_letters(),
        keys.pending(),
        keys.payloads(),
        keys.seq(),
        keys.missing(),
        keys.recover_lock(),
        keys.batch("shoes"),
        keys.batch("shoes", "ids"),
        keys.batch("shoes", "state"),
        keys.batch("shoes", "failed"),
        keys.batch_events(),
        keys.openai_batch("batch_1"),
        keys.openai_batches(),
        keys.api_tokens("0123456789abcdef"),
        keys.api_in_flight("0123456789abcdef"),
    ]


# The literals the code built before `producer/core/keys.py` (ledger.py, recovery.py, batch.py, broker.py).
TODAYS_KEYS = [
    "vlmq:deliveries:j1",
    "vlmq:done:j1",
    "vlmq:receipts:j1",
    "vlmq:seen:j1",
    "vlmq:claim:j1",
    "vlmq:dead-letters:bulk",
    "vlmq:pending:bulk",
    "vlmq:payloads:bulk",
    "vlmq:seq:bulk",
    "vlmq:missing:bulk",
    "vlmq:recover-lock:bulk",
    "vlmq:batch:shoes",
    "vlmq:batch:shoes:ids",
    "vlmq:batch:shoes:state",
    "vlmq:batch:shoes:failed",
    "vlmq:batch-events",
    "vlmq:openai-batch:batch_1",
    "vlmq:openai-batches",
    "vlmq:api-tokens:0123456789abcdef",
    "vlmq:api-in-flight:0123456789abcdef",
]


@pytest.fixture(autouse=True)
def no_namespace_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLMQ_REDIS_NAMESPACE", raising=False)


def test_the_default_namespace_gives_todays_keys_byte_for_byte() -> None:
    settings = ClientSettings(queue="bulk")
    assert settings.redis_namespace == "vlmq"
    assert every_key(Keys.of(settings)) == TODAYS_KEYS


def test_a_second_namespace_changes_every_key() -> None:
    other = every_key(Keys.of(ClientSettings(queue="bulk", redis_namespace="staging")))
    assert other == [key.replace("vlmq:", "staging:", 1) for key in TODAYS_KEYS]
    assert not set(other) & set(TODAYS_KEYS)


def test_the_ledger_and_batches_use_the_settings_namespace() -> None:
    ledger = Ledger(ClientSettings(queue="bulk", redis_namespace="team-b"))
    assert (ledger.dead_key, ledger.pending_key, ledger.payloads_key) == (
        "team-b:dead-letters:bulk",
        "team-b:pending:bulk",
        "team-b:payloads:bulk",
    )
    assert BatchStore(ledger.redis, ledger.keys).key("shoes", "ids") == "team-b:batch:shoes:ids"


def test_the_exporter_reads_pending_jobs_of_any_queue_in_its_namespace() -> None:
    assert Keys(namespace="team-b", queue="bulk").for_queue("other").pending() == "team-b:pending:other"


@pytest.mark.parametrize("namespace", ["", "a:b", "has space", "x" * 65])
def test_a_namespace_outside_letters_digits_dot_dash_underscore_is_refused(namespace: str) -> None:
    with pytest.raises(ValidationError, match="redis_namespace"):
        ClientSettings(redis_namespace=namespace)
