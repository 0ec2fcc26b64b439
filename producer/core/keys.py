"""Every Redis key vlmq writes, one method each. All live on the broker's Redis, under `<namespace>:`.

The namespace (`VLMQ_REDIS_NAMESPACE`, default `vlmq`) lets two deployments share one Redis without sharing
state; with the default the keys are the ones vlmq always wrote. Per job (`<id>`, the Celery task id):

- `vlmq:deliveries:<id>`: how many times a worker started the job in its current run. A worker killed mid-job
  leaves it counted; the redelivered copy sees one start more than its Celery retries explain: a crash.
- `vlmq:done:<id>`: set when the job succeeded, so that a redelivered or resubmitted copy returns the stored
  result instead of running again (kept as long as results are kept).
- `vlmq:receipts:<id>`: how many times a worker received the job's message again (kombu's `redelivered`) without
  it reaching a task thread since: a message that kills the consumer itself, before any job starts, counts here.
- `vlmq:seen:<id>`: when a worker first saw a job that came without `submitted_at` (another language's client),
  so that TTLs hold for it too.
- `vlmq:claim:<id>`: set for a minute by `Client.submit_once` (the HTTP API's submit) when it sends the job, so
  that two requests with the same id racing each other send it once.

Per bulk queue (`<queue>`, `VLMQ_QUEUE`; the interactive queue's jobs are kept under it too):

- `vlmq:dead-letters:<queue>`: hash of job id -> {"job": the job JSON, "result": its failed JobResult}, for jobs
  that exhausted their retries or kept killing workers. `vlmq dead-letters` lists it; `vlmq retry-failed`
  re-enqueues them with the same ids. A message with no usable task id is kept there too, under
  `message:<uuid>`, with a bounded copy of its headers and body in "message" (it has no job to retry).
- `vlmq:pending:<queue>` (sorted set, job id -> sequence number) and `vlmq:payloads:<queue>` (hash, job id ->
  {"job": ..., "queue": ..., "force": ...}): every job sent and not yet finished, to either queue. The sequence
  number is taken from `vlmq:seq:<queue>` just before the message is pushed, so it follows the order of every
  queue list; a retry takes a new one. `worker/recovery.py` uses them to send again a job whose message Redis no
  longer holds.
- `vlmq:missing:<queue>` (hash, job id -> when a sweep first missed its message) and `vlmq:recover-lock:<queue>`
  (one sweeping worker at a time): `worker/recovery.py`.

Per named batch (`<name>`; see `producer/batch.py`):

- `vlmq:batch:<name>`: hash of the batch's fields and one counter per job state;
- `vlmq:batch:<name>:ids`, `vlmq:batch:<name>:state`, `vlmq:batch:<name>:failed`: ids in input order, job id ->
  state, job id -> job JSON of the failed ones;
- `vlmq:batch-events`: the pub/sub channel a batch's end is announced on.

Per OpenAI Batch API batch of `vlmq api` (`<id>`, `batch_<hex>`, also the name of its vlmq batch):

- `vlmq:openai-batch:<id>`: hash of the OpenAI batch's own fields (input file, endpoint, metadata, lines refused
  before they became jobs, output and error file ids);
- `vlmq:openai-batches`: sorted set of batch ids by creation time, for listing.

Per bearer key of `vlmq api` (`<fp>`, the first 16 hex digits of the key's SHA-256; see `producer/api/limits.py`):

- `vlmq:api-tokens:<fp>`: hash (tokens, at): the key's token bucket, shared by every API process;
- `vlmq:api-in-flight:<fp>`: sorted set of the key's requests in flight, lease -> when it lapses (ms, Redis time).

Per deployment:

- `vlmq:models`: sorted set of model -> when its announcement expires: the models running workers serve
  (`producer/core/served.py`; `vlmq api` lists them on /v1/models).

Not here, and not namespaced: kombu's own keys (the queue lists `<queue>` and `<queue>\\x06\\x16<step>`,
`unacked`, `unacked_index`, `_kombu.binding.*`) and Celery's results (`celery-task-meta-<id>`); queue names
already keep those apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from producer.core.settings import SharedSettings

DEFAULT_NAMESPACE = "vlmq"


@dataclass(frozen=True)
class Keys:
    """The key names of one deployment (`namespace`) and its bulk queue (`queue`)."""

    namespace: str = DEFAULT_NAMESPACE
    queue: str = "vlmq"

    @classmethod
    def of(cls, settings: SharedSettings) -> Keys:
        """The keys that `settings` (VLMQ_REDIS_NAMESPACE, VLMQ_QUEUE) name."""
        return cls(namespace=settings.redis_namespace, queue=settings.queue)

    def for_queue(self, queue: str) -> Keys:
        """The same namespace, another bulk queue (the exporter reads any queue it is given)."""
        return replace(self, queue=queue)

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    # -- per job -------------------------------------------------------------------------------------------------
    def deliveries(self, job_id: str) -> str:
        return self._key("deliveries", job_id)

    def done(self, job_id: str) -> str:
        return self._key("done", job_id)

    def receipts(self, job_id: str) -> str:
        return self._key("receipts", job_id)

    def seen(self, job_id: str) -> str:
        return self._key("seen", job_id)

    def claim(self, job_id: str) -> str:
        return self._key("claim", job_id)

    def per_job(self, job_id: str) -> list[str]:
        """Every per-job key of `job_id`."""
        return [
            self.deliveries(job_id),
            self.done(job_id),
            self.receipts(job_id),
            self.seen(job_id),
            self.claim(job_id),
        ]

    # -- per bulk queue ------------------------------------------------------------------------------------------
    def dead_letters(self) -> str:
        return self._key("dead-letters", self.queue)

    def pending(self) -> str:
        return self._key("pending", self.queue)

    def payloads(self) -> str:
        return self._key("payloads", self.queue)

    def seq(self) -> str:
        return self._key("seq", self.queue)

    def missing(self) -> str:
        return self._key("missing", self.queue)

    def recover_lock(self) -> str:
        return self._key("recover-lock", self.queue)

    # -- per batch -----------------------------------------------------------------------------------------------
    def batch(self, name: str, part: str = "") -> str:
        """The batch's hash, or with `part` (`ids`, `state`, `failed`) one of its other keys."""
        return self._key("batch", name, part) if part else self._key("batch", name)

    def batch_events(self) -> str:
        """The pub/sub channel batch ends are announced on."""
        return self._key("batch-events")

    # -- per OpenAI batch (vlmq api) -----------------------------------------------------------------------------
    def openai_batch(self, batch_id: str) -> str:
        return self._key("openai-batch", batch_id)

    def openai_batches(self) -> str:
        return self._key("openai-batches")

    # -- per bearer key (vlmq api) -------------------------------------------------------------------------------
    def api_tokens(self, key_id: str) -> str:
        return self._key("api-tokens", key_id)

    def api_in_flight(self, key_id: str) -> str:
        return self._key("api-in-flight", key_id)

    # -- per deployment ------------------------------------------------------------------------------------------
    def models(self) -> str:
        """The models running workers serve (`producer/core/served.py`)."""
        return self._key("models")
