"""Per-key limits that every `vlmq api` replica shares, kept in Redis and checked by one Lua script per request.

- Rate: a token bucket per key (VLMQ_RATE_LIMIT_PER_S, VLMQ_RATE_BURST), refilled by Redis's own clock (`TIME`), so
  replicas on hosts whose clocks differ still agree.
- Concurrency: the key's requests in flight (VLMQ_MAX_CONCURRENT_PER_KEY) are leases in a sorted set, one per
  request, scored by when it lapses. A request's end removes its lease before its last byte is sent (a client that
  sends its next request on reading the answer finds the slot free); the process renews its running requests'
  leases every LEASE_S / 3, so those of a replica that died lapse within LEASE_S instead of holding slots for ever.

The script runs by EVALSHA: one round trip admits a request or refuses it (redis-py's `register_script` loads it
again after a Redis restart). A key is known in Redis by a fingerprint (the first 16 hex digits of its SHA-256), not
by its position in VLMQ_API_KEYS, so replicas whose key lists are in different orders still share each key's limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import uuid
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from producer.api.errors import ApiError
from producer.api.settings import ApiSettings
from producer.core.keys import Keys

log = logging.getLogger(__name__)
LEASE_S = 30.0

# One call admits or refuses a batch of requests (those that arrived together) and frees the slots of requests
# that ended. KEYS: for each admission its key's bucket (hash: tokens, at) and lease set (sorted set: lease ->
# lapses at, ms), then the lease set of each release. ARGV: rate per s, burst, most in flight, lease ms, how many
# admissions, each admission's lease, each release's lease. Each key is read and written once per call, however
# many of its requests the call holds.
# Returns, per admission: 0, 0 admitted (its lease taken); 1, 0 too many in flight; 2, ms over the rate (a token in
# ms).
ADMIT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local rate, burst, most, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local admits = tonumber(ARGV[5])
for i = 2 * admits + 1, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[5 + i - admits])
end
local seen, out = {}, {}
for i = 1, admits do
  local leases = KEYS[2 * i]
  local key = seen[leases]
  if not key then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
    local bucket = redis.call('HMGET', KEYS[2 * i - 1], 'tokens', 'at')
    local tokens = tonumber(bucket[1]) or burst
    local at = tonumber(bucket[2]) or now_ms
    key = {bucket = KEYS[2 * i - 1], held = redis.call('ZCARD', leases), taken = {},
           tokens = math.min(burst, tokens + math.max(0, now_ms - at) * rate / 1000)}
    seen[leases] = key
  end
  local verdict, wait_ms = 0, 0
  if key.held >= most then
    verdict = 1
  elseif key.tokens < 1 then
    verdict, wait_ms = 2, math.ceil((1 - key.tokens) * 1000 / rate)
  else
    key.tokens, key.held = key.tokens - 1, key.held + 1
    table.insert(key.taken, now_ms + lease_ms)
    table.insert(key.taken, ARGV[5 + i])
  end
  out[2 * i - 1], out[2 * i] = verdict, wait_ms
end
for leases, key in pairs(seen) do
  if #key.taken > 0 then
    redis.call('HSET', key.bucket, 'tokens', tostring(key.tokens), 'at', now_ms)
    redis.call('PEXPIRE', key.bucket, math.ceil(burst * 1000 / rate) + 1000)
    redis.call('ZADD', leases, unpack(key.taken))
    redis.call('PEXPIRE', leases, lease_ms)
  end
end
return out
"""

# KEYS: lease sets; ARGV: the lease in each, then the lease length in ms. Renews the leases still held.
RENEW = """
local now = redis.call('TIME')
local until_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[#ARGV])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', until_ms, ARGV[i])
  redis.call('PEXPIRE', key, tonumber(ARGV[#ARGV]))
end
return #KEYS
"""


def fingerprint(key: bytes) -> str:
    """How Redis knows an API key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:16]


@dataclass
class _Call:
    """An admission (with its bucket, `tokens`) or a release, waiting for the next script call."""

    lease: str
    leases: str  # the lease set
    tokens: str | None  # the bucket, for an admission
    done: asyncio.Future[tuple[int, int]]


class Limiter:
    """The limits of one API process, over the broker's Redis (asyncio client). Requests that arrive together are
    admitted by one script call (with the slots of requests that ended meanwhile given back in it): under load one
    round trip serves many requests, and a lone request goes at once."""

    def __init__(self, settings: ApiSettings, client: aioredis.Redis | None = None, lease_s: float = LEASE_S) -> None:
        self.settings = settings
        self.keys = Keys.of(settings)
        self.redis = client or aioredis.Redis.from_url(settings.broker_url)
        self.admit_script = self.redis.register_script(ADMIT)
        self.renew_script = self.redis.register_script(RENEW)
        self.lease_s = lease_s
        self.lease_ms = int(lease_s * 1000)
        self.prefix = uuid.uuid4().hex[:12]  # this process's leases: <prefix>:<n>
        self.numbers = itertools.count()
        self.held: dict[str, str] = {}  # lease -> the lease set it is in, for renewal
        self.waiting: list[_Call] = []
        self.sending = False
        self.sender: asyncio.Task[None] | None = None  # the loop keeps only weak references to tasks
        self.renewer: asyncio.Task[None] | None = None

    async def admit(self, key_id: str) -> str:
        """Take a slot and a token for the key (its fingerprint); returns the request's lease.

        Raises:
            ApiError: 429 `rate_limited`, with Retry-After.
            redis.RedisError: Redis could not be reached.
        """
        lease = f"{self.prefix}:{next(self.numbers)}"
        leases = self.keys.api_in_flight(key_id)
        verdict, wait_ms = await self._send(_Call(lease, leases, self.keys.api_tokens(key_id), self._future()))
        s = self.settings
        if verdict == 1:
            raise ApiError(
                429,
                "rate_limited",
                f"this key has {s.max_concurrent_per_key} requests in flight, the most it may (across every API "
                "process); wait for one to finish",
                headers={"Retry-After": "1"},
            )
        if verdict == 2:
            wait_s = wait_ms / 1000
            raise ApiError(
                429,
                "rate_limited",
                f"this key sends more than {s.rate_limit_per_s:g} requests per second; retry after {wait_s:.2f} s",
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
        self.held[lease] = leases
        if self.renewer is None or self.renewer.done():
            self.renewer = asyncio.create_task(self._renew())
        return lease

    async def release(self, lease: str) -> None:
        """Give the request's slot back; when Redis cannot be reached, its lease lapses by itself."""
        leases = self.held.pop(lease, None)
        if leases is None:
            return
        try:
            await self._send(_Call(lease, leases, None, self._future()))
        except redis.RedisError as exc:
            log.warning("could not release a request's slot (%s); it lapses within %.0f s", exc, self.lease_s)

    def _future(self) -> asyncio.Future[tuple[int, int]]:
        return asyncio.get_running_loop().create_future()

    def _send(self, call: _Call) -> asyncio.Future[tuple[int, int]]:
        self.waiting.append(call)
        if not self.sending:
            self.sending = True
            # It runs on the loop's next turn: the requests that arrived with this one join the same call.
            self.sender = asyncio.create_task(self._send_waiting())
        return call.done

    async def _send_waiting(self) -> None:
        """One script call for every waiting admission and release, until none waits."""
        try:
            while self.waiting:
                calls, self.waiting = self.waiting, []
                admits = [c for c in calls if c.tokens is not None]
                releases = [c for c in calls if c.tokens is None]
                s = self.settings
                try:
                    replies = await self.admit_script(
                        keys=[k for c in admits for k in (c.tokens or "", c.leases)] + [c.leases for c in releases],
                        args=[s.rate_limit_per_s, s.rate_burst, s.max_concurrent_per_key, self.lease_ms, len(admits)]
                        + [c.lease for c in admits + releases],
                    )
                except Exception as exc:
                    for call in calls:
                        if not call.done.done():
                            call.done.set_exception(exc)
                    continue
                for n, call in enumerate(admits):
                    if not call.done.done():
                        call.done.set_result((int(replies[2 * n]), int(replies[2 * n + 1])))
                for call in releases:
                    if not call.done.done():
                        call.done.set_result((0, 0))
        finally:
            self.sending = False

    async def _renew(self) -> None:
        """While this process has requests in flight: renew their leases every third of a lease."""
        while self.held:
            await asyncio.sleep(self.lease_s / 3)
            held = list(self.held.items())
            if not held:
                continue
            try:
                await self.renew_script(keys=[k for _, k in held], args=[*(lease for lease, _ in held), self.lease_ms])
            except redis.RedisError as exc:
                log.warning("could not renew %d requests' slots: %s", len(held), exc)

    async def close(self) -> None:
        for task in (self.sender, self.renewer):
            if task is not None:
                task.cancel()
        await self.redis.aclose()
