"""What keeps the AI gateway's per-call cost low, held as behaviour (bench/ai_gateway.py has the
figures): its database connections outlive calls, a call is authorised in one query, what a key
opens is cached for a bounded time (dropped at once on saves in the process), and the
sandbox-facing app runs none of Django's per-request signals (each costs a thread hop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest
from django.core.signals import request_finished, request_started
from django.db import IntegrityError
from django.db.backends.signals import connection_created
from django.utils import timezone

from ai_gateway import credentials, proxy, usage_writer
from ai_gateway.credentials import rotate_credential
from ai_gateway.models import SandboxCredential, Upstream, UsageRecord, UserProviderKey
from ai_gateway.upstreams import routing_table
from billing.models import plan_for
from tests.fakes.model_server import FakeModelServer
from tests.test_ai_gateway import (
    USER_KEY,
    Gateway,
    gateway,
    openai_body,
    upstreams,
    wait_for_records,
)

__all__ = ["gateway", "upstreams"]  # fixtures used here

pytestmark = pytest.mark.django_db(transaction=True)


class Counter:
    """Counts a signal's sends, from any thread."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, **kwargs: Any) -> None:
        with self._lock:
            self.count += 1


@pytest.fixture
def connections_made() -> Iterator[Counter]:
    counter = Counter()
    connection_created.connect(counter, dispatch_uid="test-connections-made")
    yield counter
    connection_created.disconnect(dispatch_uid="test-connections-made")


def test_it_keeps_its_database_connections_between_calls(
    gateway: Gateway, model_server: FakeModelServer, connections_made: Counter
) -> None:
    for _ in range(3):  # the worker threads that serve these calls connect once
        assert gateway.openai(openai_body()).status_code == 200
    connections_made.count = 0
    for _ in range(12):
        assert gateway.openai(openai_body()).status_code == 200
    # Each call authorises and records itself on the database; they reuse the connections.
    assert connections_made.count < 3


def test_it_authorizes_a_call_in_one_query(
    gateway: Gateway, alice: Any, upstreams: dict[str, Upstream],
    django_assert_num_queries: Any, settings: Any,
) -> None:  # fmt: skip
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"  # admission is a Redis step, not counted here
    plan = plan_for(alice)
    UserProviderKey.objects.create(user=alice, provider="openai", api_key=USER_KEY, hint="x")
    SandboxCredential.objects.update(last_used_at=timezone.now())
    routing_table()  # loaded once per TABLE_TTL, not per call
    call = proxy.Call(api="openai", model="gpt-4o-mini", streaming=True)
    with django_assert_num_queries(1):
        proxy.authorize(call, gateway.key, openai_body(), 100, {})
    assert (call.user_id, call.sandbox_id) == (alice.pk, alice.sandboxes.get().pk)
    assert call.plan_name == plan.name
    assert call.limits.requests_per_minute == plan.requests_per_minute
    [target] = call.targets
    assert (target.byok, target.api_key) == (True, USER_KEY)


def test_it_authorizes_an_owner_with_no_account_yet(
    gateway: Gateway, alice: Any, upstreams: dict[str, Upstream]
) -> None:
    alice.account.delete()
    call = proxy.Call(api="openai", model="gpt-4o-mini", streaming=True)
    proxy.authorize(call, gateway.key, openai_body(), 100, {})
    assert call.plan_name == plan_for(alice).name
    assert call.targets[0].byok is False


def test_it_runs_no_request_signals(gateway: Gateway, model_server: FakeModelServer) -> None:
    started, finished = Counter(), Counter()
    request_started.connect(started, dispatch_uid="test-gateway-started")
    request_finished.connect(finished, dispatch_uid="test-gateway-finished")
    try:
        assert gateway.openai(openai_body()).status_code == 200
        assert gateway.openai(openai_body(stream=False)).status_code == 200
    finally:
        request_started.disconnect(dispatch_uid="test-gateway-started")
        request_finished.disconnect(dispatch_uid="test-gateway-finished")
    assert (started.count, finished.count) == (0, 0)


def test_it_drops_cached_keys_when_this_process_saves(
    gateway: Gateway, model_server: FakeModelServer, alice: Any
) -> None:
    assert gateway.openai(openai_body()).status_code == 200  # alice's key is cached now
    new = rotate_credential(alice.sandboxes.get())
    assert gateway.openai(openai_body()).status_code == 401
    assert gateway.openai(openai_body(), key=new).status_code == 200
    alice.is_active = False
    alice.save()
    assert gateway.openai(openai_body(), key=new).status_code == 403


def test_it_reads_a_key_again_after_the_cache_time(
    gateway: Gateway, alice: Any, settings: Any
) -> None:
    settings.HERMIT_AI_KEY_CACHE_SECONDS = 5
    start = time.monotonic()
    holder = credentials.authenticate(gateway.key, now=start)
    assert holder is not None and holder.owner_active
    # Saved by another process (no signal here): seen once the cached holder has expired.
    type(alice).objects.filter(pk=alice.pk).update(is_active=False)
    cached = credentials.authenticate(gateway.key, now=start + 4.9)
    assert cached is not None and cached.owner_active
    fresh = credentials.authenticate(gateway.key, now=start + 5.1)
    assert fresh is not None and not fresh.owner_active


def test_it_caches_no_key_when_told_not_to(gateway: Gateway, alice: Any, settings: Any) -> None:
    settings.HERMIT_AI_KEY_CACHE_SECONDS = 0
    start = time.monotonic()
    assert credentials.authenticate(gateway.key, now=start) is not None
    type(alice).objects.filter(pk=alice.pk).update(is_active=False)
    holder = credentials.authenticate(gateway.key, now=start)
    assert holder is not None and not holder.owner_active


def test_it_records_each_of_many_calls_that_end_together_once(
    gateway: Gateway, model_server: FakeModelServer, alice: Any, settings: Any
) -> None:
    settings.HERMIT_AI_MAX_CONCURRENT_CALLS = 0
    model_server.script(prompt_tokens=7, completion_tokens=3)
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: Gateway(gateway.base, gateway.key).openai(
            openai_body()).status_code, range(12)))  # fmt: skip
    assert codes == [200] * 12
    rows = wait_for_records(12)
    assert len(rows) == 12 and UsageRecord.objects.count() == 12
    assert {(r.user_id, r.input_tokens, r.output_tokens, r.outcome) for r in rows} == {
        (alice.pk, 7, 3, "ok")
    }


def test_it_writes_a_batchs_good_records_when_one_fails(alice: Any) -> None:
    first, *good = [UsageRecord(user=alice, api="openai", model=f"m{i}") for i in range(4)]
    bad = UsageRecord(user_id=alice.pk + 10_000, api="openai", model="bad")  # no such user
    release = threading.Event()

    def hold_the_writer() -> tuple[UsageRecord, None]:
        release.wait(5)  # the others queue up meanwhile, to be written as one batch
        return first, None

    async def write_together() -> list[Any]:
        held = asyncio.ensure_future(usage_writer.write(hold_the_writer))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(usage_writer.write(partial(lambda r: (r, None), row)))
                for row in (good[0], bad, *good[1:])]  # fmt: skip
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(held, *rest, return_exceptions=True)

    results = asyncio.run(write_together())
    assert isinstance(results[2], IntegrityError)
    assert [r.model for r in results if isinstance(r, UsageRecord)] == ["m0", "m1", "m2", "m3"]
    assert sorted(UsageRecord.objects.values_list("model", flat=True)) == ["m0", "m1", "m2", "m3"]
