"""Per-key limits across replicas: two real `vlmq api` processes on one Redis admit, together, exactly what one
would (rate and requests in flight), also when their VLMQ_API_KEYS list the keys in different orders."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from producer.api.errors import ApiError
from producer.api.limits import Limiter
from producer.api.settings import ApiSettings
from tests.apiserver import Api, module_stack, start_api
from tests.conftest import Stack
from tests.helpers import scrape
from worker.devtools.local_services import RedisServer, wait_until

__all__ = ["module_stack"]

IN_FLIGHT = ("vlmq_api_requests_in_flight", ())


def job() -> dict[str, object]:
    return {"id": uuid.uuid4().hex, "media": ["s3://b/a.png"]}


def test_two_api_processes_share_each_keys_rate_and_concurrency(module_stack: Stack) -> None:
    rated, other, busy = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("rated", "other", "busy"))
    limits = {"VLMQ_RATE_LIMIT_PER_S": "0.2", "VLMQ_RATE_BURST": "5", "VLMQ_MAX_CONCURRENT_PER_KEY": "2"}
    a = start_api(module_stack, env={**limits, "VLMQ_API_KEYS": f"{rated},{other},{busy}"}, name="api-a")
    b = start_api(module_stack, env={**limits, "VLMQ_API_KEYS": f"{busy},{other},{rated}"}, name="api-b")
    try:
        with a.client(key=rated) as on_a, b.client(key=rated) as on_b, b.client(key=other) as other_on_b:
            # 8 submissions of one key, taking turns between the processes: one burst of 5 for both together.
            codes = [(on_a, on_b)[n % 2].post("/jobs", json=job()).status_code for n in range(8)]
            refused = on_b.post("/jobs", json=job())
            assert other_on_b.post("/jobs", json=job()).status_code == 202  # another key has its own bucket
        held, third = two_long_polls_and_more(a, b, busy)
    finally:
        a.stop()
        b.stop()

    assert codes == [202, 202, 202, 202, 202, 429, 429, 429]
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "5")
    assert refused.json()["error"]["message"].startswith("this key sends more than 0.2 requests per second; retry")
    assert held == [200, 200]
    assert third == [429, 429, 200]  # on a and on b while both slots are held; once they are free again


def two_long_polls_and_more(a: Api, b: Api, key: str) -> tuple[list[int], list[int]]:
    """With one long poll on each process holding the key's 2 slots: a third request on each (429 expected), and
    one more once the polls have answered."""
    with a.client(key=key) as on_a, b.client(key=key) as on_b:
        waited_on = job()
        assert on_a.post("/jobs", json=waited_on).status_code == 202  # no worker runs it: the polls wait 3 s

        def poll(api: Api) -> int:
            with api.client(key=key) as client:
                return client.get(f"/jobs/{waited_on['id']}", params={"wait": 3}).status_code

        with ThreadPoolExecutor(2) as pool:
            polls = [pool.submit(poll, api) for api in (a, b)]
            wait_until(lambda: scrape(a.port)[IN_FLIGHT] == scrape(b.port)[IN_FLIGHT] == 1, 10, "a poll on each")
            third: list[httpx.Response] = [on_a.get("/v1/models"), on_b.get("/v1/models")]
            held = [p.result() for p in polls]
        third.append(on_a.get("/v1/models"))
    message = "this key has 2 requests in flight, the most it may (across every API process); wait for one to finish"
    assert [r.json()["error"]["message"] for r in third[:2]] == [message, message]
    return held, [r.status_code for r in third]


def test_a_dead_replicas_requests_free_their_slots_once_their_leases_lapse(redis_server: RedisServer) -> None:
    """Two limiters (two API processes) on a real Redis, one slot per key, leases of 0.3 s: a request held by a live
    process keeps its slot past its lease (renewed); once its process stops renewing (it died), the slot is free
    within the lease."""
    settings = ApiSettings(broker_url=redis_server.url, max_concurrent_per_key=1, redis_namespace=uuid.uuid4().hex)

    async def scenario() -> tuple[str, str, float]:
        alive, other = Limiter(settings, lease_s=0.3), Limiter(settings, lease_s=0.3)
        await alive.admit("key")
        await asyncio.sleep(0.9)  # three leases long: renewed
        with pytest.raises(ApiError) as held:
            await other.admit("key")
        assert alive.renewer is not None
        alive.renewer.cancel()  # the process died: nothing renews or releases its lease
        died = time.monotonic()
        while True:
            try:
                await other.admit("key")
                break
            except ApiError:
                await asyncio.sleep(0.02)
        freed_after = time.monotonic() - died
        await alive.close()
        await other.close()
        return held.value.code, held.value.message, freed_after

    code, message, freed_after = asyncio.run(scenario())
    assert (code, message) == (
        "rate_limited",
        "this key has 1 requests in flight, the most it may (across every API process); wait for one to finish",
    )
    assert freed_after < 0.5


def test_requests_admitted_together_in_one_call_count_one_by_one(redis_server: RedisServer) -> None:
    """20 requests of one key arriving at once go to Redis in one script call: exactly as many are admitted as the
    cap (5 in flight) or the burst (3) allows, and their slots come back when they end."""

    async def outcomes(limiter: Limiter, key: str) -> list[str]:
        verdicts = await asyncio.gather(*(limiter.admit(key) for _ in range(20)), return_exceptions=True)
        return [v.message.split(";")[0] if isinstance(v, ApiError) else "admitted" for v in verdicts]

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        namespace = uuid.uuid4().hex
        capped = Limiter(ApiSettings(broker_url=redis_server.url, max_concurrent_per_key=5, redis_namespace=namespace))
        first = await outcomes(capped, "capped")
        await asyncio.gather(*(capped.release(lease) for lease in list(capped.held)))
        again = await outcomes(capped, "capped")
        rated = Limiter(ApiSettings(broker_url=redis_server.url, rate_burst=3, redis_namespace=namespace))
        burst = await outcomes(rated, "rated")
        for limiter in (capped, rated):
            await limiter.close()
        return first, again, burst

    first, again, burst = asyncio.run(scenario())
    busy = "this key has 5 requests in flight, the most it may (across every API process)"
    assert first == again == ["admitted"] * 5 + [busy] * 15
    assert burst == ["admitted"] * 3 + ["this key sends more than 200 requests per second"] * 17
