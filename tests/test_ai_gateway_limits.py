"""AI gateway limits under load: the quota is reserved atomically, calls at once are capped, and
refused calls count nowhere — on Redis and on the database (no Redis) alike.

Every test runs on both stores: ``store`` sets settings.REDIS_URL to the run's Redis (or the
local one) or to "" for the database path.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import time_machine

from ai_gateway import limits
from ai_gateway.limits import Amount, Limits
from billing.models import plan_for
from tests.fakes.model_server import FakeModelServer
from tests.test_ai_gateway import Gateway, gateway, openai_body, upstreams, wait_for_records

__all__ = ["gateway", "upstreams"]  # fixtures used here

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["db", "redis"])
def store(request: Any, settings: Any) -> Iterator[str]:
    settings.REDIS_URL = (
        "" if request.param == "db" else os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    )
    yield request.param


def forget(user_id: int) -> None:
    """Drop the user's Redis state (user ids may repeat across test runs' databases)."""
    if not limits.uses_redis():
        return

    async def drop() -> None:
        client = limits._redis()
        keys = [k async for k in client.scan_iter(f"hermit:ai:*:{user_id}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()

    asyncio.run(drop())


def burst(gateway: Gateway, body: dict[str, Any], n: int) -> list[int]:
    """Send ``n`` calls at once; return their status codes."""

    def call(_: int) -> int:
        return Gateway(gateway.base, gateway.key).openai(body).status_code

    with ThreadPoolExecutor(n) as pool:
        return sorted(pool.map(call, range(n)))


def test_it_admits_only_what_fits_the_quota(store: str, gateway: Gateway,
                                            model_server: FakeModelServer, alice: Any,
                                            settings: Any) -> None:  # fmt: skip
    forget(alice.pk)
    settings.HERMIT_AI_MAX_CONCURRENT_CALLS = 0
    plan = plan_for(alice)
    plan.monthly_spend_limit, plan.monthly_token_quota = Decimal("0.02"), 0
    plan.save()
    # Each call reserves ~40 input + 10,000 output tokens of gpt-4o-mini: just over $0.006.
    body = openai_body(max_tokens=10_000)
    model_server.script(reply="abc", chunks=3, delay=0.4, prompt_tokens=10, completion_tokens=5)
    for _ in range(2):  # the second burst shows the reservations were released
        codes = burst(gateway, body, 10)
        assert codes == [200] * 3 + [429] * 7
    rows = wait_for_records(20)
    assert [r.outcome for r in rows].count("ok") == 6
    refused = [r for r in rows if r.outcome == "refused"]
    assert all("spend limit" in r.error for r in refused), [r.error for r in refused]
    assert len(model_server.requests) == 6


def test_it_caps_calls_at_once(store: str, gateway: Gateway, model_server: FakeModelServer,
                               alice: Any, settings: Any) -> None:  # fmt: skip
    forget(alice.pk)
    settings.HERMIT_AI_MAX_CONCURRENT_CALLS = 2
    model_server.script(reply="abc", chunks=3, delay=0.4)
    assert burst(gateway, openai_body(max_tokens=100), 5) == [200, 200, 429, 429, 429]
    refused = [r for r in wait_for_records(5) if r.outcome == "refused"]
    assert all("at most 2 may run together" in r.error for r in refused)
    model_server.script(reply="abc")
    assert burst(gateway, openai_body(max_tokens=100), 2) == [200, 200]  # released


def test_it_counts_no_refused_call_in_the_rate_window(store: str, alice: Any) -> None:
    """1 a minute: a call refused at +30 s must not push the next free slot past +60 s; a call
    refused for another limit (calls at once) must not use up a slot either."""
    forget(alice.pk)
    start = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)

    def admit(lim: Limits) -> limits.Verdict:
        if limits.uses_redis():
            return asyncio.run(limits.admit_redis(alice.pk, lim, Amount()))
        return limits.admit_db(alice.pk, lim, Amount())

    def settle(ticket: limits.Ticket | None) -> None:
        assert ticket is not None
        if limits.uses_redis():
            asyncio.run(limits.settle_redis(ticket, Amount()))
        else:
            limits.settle_db(ticket, Amount())

    one_a_minute = Limits(1, 0, 0, 0)
    with time_machine.travel(start, tick=False) as clock:
        settle(admit(one_a_minute).ticket)
        clock.shift(timedelta(seconds=30))
        refused = admit(one_a_minute)
        assert refused.reason == "rate" and 29 <= refused.retry_after <= 31
        clock.shift(timedelta(seconds=31))
        settle(admit(one_a_minute).ticket)  # at +61 s

        clock.shift(timedelta(minutes=5))
        two_one_at_once = Limits(2, 1, 0, 0)
        first = admit(two_one_at_once).ticket
        assert admit(two_one_at_once).reason == "busy"
        settle(first)
        assert admit(two_one_at_once).ticket is not None  # the busy refusal took no slot
        assert admit(two_one_at_once).reason == "rate"


def test_it_limits_requests_a_minute_without_redis(settings: Any, alice: Any) -> None:
    settings.REDIS_URL = ""
    three = Limits(3, 0, 0, 0)
    verdicts = [limits.admit_db(alice.pk, three, Amount()) for _ in range(4)]
    assert [v.ticket is not None for v in verdicts] == [True, True, True, False]
    assert verdicts[-1].reason == "rate" and verdicts[-1].retry_after > 55
