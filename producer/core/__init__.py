"""The shared core: what producers (`producer.client`, `producer.api`, `producer.cli`) and workers (`worker`) both
use. The job contract (`jobs`), every Redis key (`keys`), the ledger of sent and finished jobs (`ledger`), the result
store (`results`), named batches' counts (`batches`), the one publish path (`publish`), how a job's end is recorded
(`endings`), Celery's configuration (`celery_config`), the settings both sides share (`settings`), and the checks
both run before they start (`preflight`).

It imports nothing else of `producer`, and a worker imports nothing of `producer` but this package
(tests/unit/test_layering.py).
"""
