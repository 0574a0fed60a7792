"""The metered AI gateway: real gateway app (uvicorn) → real fake provider (aiohttp).

alice owns a sandbox with a gateway key; bob owns another. Every call goes over real HTTP to
the sandbox-facing app, which forwards to the fake model server on its own port.
"""

from __future__ import annotations

import json
import logging
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.db import connection
from django.urls import reverse

from ai_gateway.credentials import rotate_credential
from ai_gateway.models import (
    ModelRoute,
    Price,
    SandboxCredential,
    Upstream,
    UsageRecord,
    UserProviderKey,
)
from ai_gateway.usage import month_usage
from billing.models import plan_for
from tests.fakes.model_server import FakeModelServer, Script

pytestmark = pytest.mark.django_db(transaction=True)

OPERATOR_KEY = "sk-operator-aaaaaaaaaaaaaaaa"
USER_KEY = "sk-alice-own-bbbbbbbbbbbbbbbb"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def make_upstream(fake: FakeModelServer, provider: str, name: str, key: str = OPERATOR_KEY,
                  **extra: Any) -> Upstream:  # fmt: skip
    base = fake.url if provider == "anthropic" else fake.openai_base_url
    return Upstream.objects.create(
        name=name, provider=provider, base_url=base, api_key=key, **extra
    )


def openai_body(stream: bool = True, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return {**body, **extra}


def anthropic_body(stream: bool = True, model: str = "claude-sonnet-4-5") -> dict[str, Any]:
    return {"model": model, "max_tokens": 1024, "messages": MESSAGES, "stream": stream}


def wait_for_records(count: int, timeout: float = 5.0) -> list[UsageRecord]:
    """Usage is written as a response ends, just after the client has its last byte."""
    deadline = time.monotonic() + timeout
    while True:
        rows = list(UsageRecord.objects.order_by("id"))
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


class Gateway:
    """A client of the sandbox-facing gateway with one sandbox's key."""

    def __init__(self, base: str, key: str) -> None:
        self.base, self.key = base, key
        self.http = httpx.Client(timeout=30)

    def openai(self, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        key = self.key if key is None else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.http.post(f"{self.base}/ai/v1/chat/completions", json=body, headers=headers)

    def anthropic(self, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        headers = {"x-api-key": key or self.key, "anthropic-version": "2023-06-01"}
        return self.http.post(f"{self.base}/ai/v1/messages", json=body, headers=headers)


@pytest.fixture
def upstreams(model_server: FakeModelServer) -> dict[str, Upstream]:
    Price.objects.update_or_create(model="gpt-4o-mini", defaults=dict(
        input_per_million=Decimal("0.15"), cached_input_per_million=Decimal("0.075"),
        output_per_million=Decimal("0.60")))  # fmt: skip
    Price.objects.update_or_create(model="claude-*", defaults=dict(
        input_per_million=Decimal(3), cached_input_per_million=Decimal("0.3"),
        output_per_million=Decimal(15)))  # fmt: skip
    return {
        "openai": make_upstream(model_server, "openai", "fake-openai", accepts_user_keys=True),
        "anthropic": make_upstream(
            model_server, "anthropic", "fake-anthropic", accepts_user_keys=True
        ),
    }


@pytest.fixture
def gateway(ai_gateway_server: Any, alice: Any, upstreams: dict[str, Upstream]) -> Gateway:
    key = rotate_credential(alice.sandboxes.get())
    return Gateway(ai_gateway_server.url, key)


def sse_data(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_it_records_exact_openai_stream_tokens(gateway: Gateway, model_server: FakeModelServer,
                                                alice: Any) -> None:  # fmt: skip
    model_server.script(reply="Hello there!", chunks=4, prompt_tokens=1200,
                        completion_tokens=37, cached_tokens=200)  # fmt: skip
    response = gateway.openai(openai_body())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_data(response.text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == "Hello there!"
    assert events[-2]["usage"]["prompt_tokens"] == 1200

    [row] = wait_for_records(1)
    assert (row.user, row.sandbox) == (alice, alice.sandboxes.get())
    assert (row.input_tokens, row.output_tokens, row.cached_tokens) == (1200, 37, 200)
    # 1000 x 0.15 + 200 x 0.075 + 37 x 0.60, per million
    assert row.cost == Decimal("0.000187")
    assert (row.status_code, row.outcome, row.api) == (200, "ok", "openai")
    assert row.model == "gpt-4o-mini"
    assert row.ttfb_ms is not None and row.latency_ms >= row.ttfb_ms
    upstream_request = model_server.requests[-1]
    assert upstream_request.headers["Authorization"] == f"Bearer {OPERATOR_KEY}"
    assert gateway.key not in json.dumps(upstream_request.headers)


def test_it_records_exact_anthropic_stream_tokens(gateway: Gateway, model_server: FakeModelServer,
                                                   alice: Any) -> None:  # fmt: skip
    model_server.script(reply="Hi from Claude", chunks=3, prompt_tokens=900,
                        completion_tokens=12, cached_tokens=100)  # fmt: skip
    response = gateway.anthropic(anthropic_body())
    assert response.status_code == 200
    kinds = [line[7:] for line in response.text.splitlines() if line.startswith("event: ")]
    assert kinds == ["message_start", "content_block_start", "ping", "content_block_delta",
                     "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]  # fmt: skip
    [row] = wait_for_records(1)
    # Anthropic's input_tokens exclude cache reads; the gateway counts every prompt token.
    assert (row.input_tokens, row.output_tokens, row.cached_tokens) == (1000, 12, 100)
    assert row.cost == Decimal("0.002910")  # 900 x 3 + 100 x 0.3 + 12 x 15, per million
    assert (row.api, row.outcome, row.model) == ("anthropic", "ok", "claude-sonnet-4-5")
    upstream_request = model_server.requests[-1]
    assert upstream_request.headers["x-api-key"] == OPERATOR_KEY
    assert upstream_request.headers["anthropic-version"] == "2023-06-01"


def test_it_meters_non_streaming_calls(gateway: Gateway, model_server: FakeModelServer) -> None:
    model_server.script(reply="Plain", prompt_tokens=50, completion_tokens=5)
    openai = gateway.openai(openai_body(stream=False))
    assert openai.json()["choices"][0]["message"]["content"] == "Plain"
    anthropic = gateway.anthropic(anthropic_body(stream=False))
    assert anthropic.json()["content"][0]["text"] == "Plain"
    rows = wait_for_records(2)
    assert [(r.api, r.input_tokens, r.output_tokens) for r in rows] == [
        ("openai", 50, 5), ("anthropic", 50, 5),
    ]  # fmt: skip


def test_it_asks_for_usage_when_the_client_did_not(
    gateway: Gateway, model_server: FakeModelServer
) -> None:
    model_server.script(prompt_tokens=10, completion_tokens=3)
    body = openai_body()
    del body["stream_options"]
    assert gateway.openai(body).status_code == 200
    assert model_server.requests[-1].json["stream_options"] == {"include_usage": True}
    [row] = wait_for_records(1)
    assert (row.input_tokens, row.output_tokens) == (10, 3)


def test_it_streams_chunks_as_they_arrive(gateway: Gateway, model_server: FakeModelServer) -> None:
    model_server.script(reply="abcdef", chunks=6, delay=0.25)
    started = time.monotonic()
    arrivals = []
    with gateway.http.stream(
        "POST", f"{gateway.base}/ai/v1/chat/completions", json=openai_body(),
        headers={"Authorization": f"Bearer {gateway.key}"},
    ) as response:  # fmt: skip
        for chunk in response.iter_raw():
            if b"delta" in chunk:
                arrivals.append(time.monotonic() - started)
    assert arrivals[0] < 0.6, "the first chunk must not wait for the whole answer"
    assert arrivals[-1] >= 1.4


def test_it_refuses_a_missing_bad_or_foreign_key(gateway: Gateway, model_server: FakeModelServer,
                                                 bob: Any) -> None:  # fmt: skip
    for key in ["", "hmk_not-a-real-key", OPERATOR_KEY, "Bearer nonsense"]:
        response = gateway.openai(openai_body(), key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    anthropic = gateway.anthropic(anthropic_body(), key="hmk_forged")
    assert anthropic.status_code == 401
    assert anthropic.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": "Invalid Hermit AI gateway key."}}  # fmt: skip
    # A key that was rotated away no longer works; the new one does.
    old = rotate_credential(bob.sandboxes.get())
    new = rotate_credential(bob.sandboxes.get())
    assert gateway.openai(openai_body(), key=old).status_code == 401
    assert gateway.openai(openai_body(), key=new).status_code == 200
    assert len(model_server.requests) == 1
    # Calls without a valid key are answered, not recorded: anyone could send millions.
    rows = wait_for_records(1)
    assert [(r.user, r.outcome) for r in rows] == [(bob, "ok")]


def test_it_stores_only_a_hash_of_the_key(alice: Any) -> None:
    key = rotate_credential(alice.sandboxes.get())
    credential = SandboxCredential.objects.get(sandbox__owner=alice)
    assert key not in (credential.key_hash, credential.prefix)
    assert key.startswith(credential.prefix) and len(credential.prefix) < 16


def test_it_refuses_calls_once_the_quota_is_used(gateway: Gateway, model_server: FakeModelServer,
                                                 alice: Any) -> None:  # fmt: skip
    plan = plan_for(alice)
    plan.monthly_token_quota = 1000
    plan.save()
    model_server.script(prompt_tokens=900, completion_tokens=100)
    # Reserved up front: ~30 tokens of request and 50 of output fit in 1000.
    assert gateway.openai(openai_body(max_tokens=50)).status_code == 200  # 1000 of 1000 used
    wait_for_records(1)
    openai = gateway.openai(openai_body())
    assert openai.status_code == 429
    error = openai.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "monthly token quota exhausted: 1,000 of 1,000" in error["message"]
    anthropic = gateway.anthropic(anthropic_body())
    assert anthropic.status_code == 429
    assert anthropic.json()["error"]["type"] == "rate_limit_error"
    assert len(model_server.requests) == 1
    usage = month_usage(alice)
    assert (usage["tokens"], usage["percent"], usage["exhausted"]) == (1000, 100, True)
    assert [r.outcome for r in wait_for_records(3)] == ["ok", "refused", "refused"]


def test_it_limits_requests_a_minute(gateway: Gateway, model_server: FakeModelServer,
                                     alice: Any) -> None:  # fmt: skip
    plan = plan_for(alice)
    plan.requests_per_minute = 2
    plan.save()
    assert gateway.openai(openai_body()).status_code == 200
    assert gateway.anthropic(anthropic_body()).status_code == 200
    third = gateway.openai(openai_body())
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(third.headers["Retry-After"]) <= 60
    assert len(model_server.requests) == 2


def test_it_falls_back_when_the_upstream_fails(gateway: Gateway, model_server: FakeModelServer,
                                               upstreams: dict[str, Upstream]) -> None:  # fmt: skip
    backup = make_upstream(model_server, "openai", "backup", key="sk-backup-cccccccccccc",
                           is_operator=False)  # fmt: skip
    ModelRoute.objects.create(pattern="gpt-*", upstream=upstreams["openai"], fallback=backup,
                              fallback_model="gpt-4o")  # fmt: skip
    model_server.enqueue(Script(status=500))
    model_server.script(reply="from the backup", prompt_tokens=7, completion_tokens=2)
    response = gateway.openai(openai_body())
    assert response.status_code == 200
    assert "from" in response.text
    first, second = model_server.requests
    assert first.headers["Authorization"] == f"Bearer {OPERATOR_KEY}"
    assert second.headers["Authorization"] == "Bearer sk-backup-cccccccccccc"
    assert second.json["model"] == "gpt-4o"
    [row] = wait_for_records(1)
    assert (row.fallback_used, row.upstream, row.outcome, row.input_tokens) == (
        True, backup, "ok", 7)  # fmt: skip


def test_it_falls_back_when_the_upstream_times_out(
    gateway: Gateway, model_server: FakeModelServer, upstreams: dict[str, Upstream]
) -> None:
    slow = upstreams["anthropic"]
    slow.timeout_seconds = 0.5
    slow.save()
    backup = make_upstream(model_server, "anthropic", "backup-a", key="sk-ant-backup-ddd",
                           is_operator=False)  # fmt: skip
    ModelRoute.objects.create(pattern="claude-*", upstream=slow, fallback=backup)
    model_server.enqueue(Script(first_byte_delay=3))
    assert gateway.anthropic(anthropic_body()).status_code == 200
    assert model_server.requests[-1].headers["x-api-key"] == "sk-ant-backup-ddd"
    assert wait_for_records(1)[0].fallback_used


def test_it_passes_a_final_upstream_error_through(
    gateway: Gateway, model_server: FakeModelServer
) -> None:
    model_server.script(status=500)
    response = gateway.anthropic(anthropic_body())
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "api_error"
    [row] = wait_for_records(1)
    assert (row.outcome, row.status_code) == ("error", 500)


def stream_then_hang_up(gateway: Gateway, api: str, body: dict[str, Any]) -> None:
    """Start a streaming call, read until the first content delta, then drop the connection."""
    if api == "openai":
        url, headers = "/ai/v1/chat/completions", {"Authorization": f"Bearer {gateway.key}"}
    else:
        url = "/ai/v1/messages"
        headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    with gateway.http.stream("POST", gateway.base + url, json=body, headers=headers) as response:
        for chunk in response.iter_raw():
            if b"delta" in chunk and b"content" in chunk:
                break
    gateway.http.close()


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_it_bills_a_client_that_disconnects_mid_stream(
    gateway: Gateway, model_server: FakeModelServer, api: str
) -> None:
    model_server.script(reply="x" * 40, chunks=40, delay=0.03, prompt_tokens=120_000,
                        completion_tokens=16_000)  # fmt: skip
    body = openai_body() if api == "openai" else anthropic_body()
    if api == "openai":
        del body["stream_options"]  # the gateway asks for usage itself
    stream_then_hang_up(gateway, api, body)
    [row] = wait_for_records(1, timeout=10)
    # The gateway read the upstream to its end after the client left, and billed all of it.
    assert model_server.completed == 1 and model_server.disconnects == 0
    assert (row.outcome, row.input_tokens, row.output_tokens) == ("cancelled", 120_000, 16_000)
    assert row.cost > 0


def test_it_bills_an_estimate_when_the_drain_is_cut(
    gateway: Gateway, model_server: FakeModelServer, settings: Any
) -> None:
    settings.HERMIT_AI_DRAIN_SECONDS = 0.2
    model_server.script(reply="x" * 100, chunks=100, delay=0.05, prompt_tokens=120_000,
                        completion_tokens=16_000)  # fmt: skip
    body = openai_body(max_tokens=3000)
    stream_then_hang_up(gateway, "openai", body)
    [row] = wait_for_records(1, timeout=10)
    assert model_server.disconnected.wait(5), "the upstream was not closed after the drain time"
    # No usage had come yet: the request's size / 4 as input, and the call's max output.
    assert row.outcome == "cancelled" and "estimated" in row.error
    assert row.output_tokens == 3000
    assert row.input_tokens == len(json.dumps(body, separators=(",", ":"))) // 4


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_it_meters_a_non_streaming_answer_over_4_mib(
    gateway: Gateway, model_server: FakeModelServer, api: str
) -> None:
    model_server.script(
        reply="y" * (5 * 1024 * 1024), prompt_tokens=321, completion_tokens=1_300_000
    )
    send = gateway.openai if api == "openai" else gateway.anthropic
    body = openai_body(stream=False) if api == "openai" else anthropic_body(stream=False)
    response = send(body)
    assert response.status_code == 200 and len(response.content) > 5 * 1024 * 1024
    [row] = wait_for_records(1)
    assert (row.outcome, row.input_tokens, row.output_tokens) == ("ok", 321, 1_300_000)


def test_it_uses_the_users_own_key(client: Any, gateway: Gateway, model_server: FakeModelServer,
                                   alice: Any, bob: Any) -> None:  # fmt: skip
    client.force_login(alice)
    page = client.post(reverse("provider-keys"), {"provider": "openai", "api_key": USER_KEY})
    assert page.status_code == 302
    listing = client.get(reverse("provider-keys")).content.decode()
    assert USER_KEY not in listing and "sk-…bbbb" in listing
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM ai_gateway_userproviderkey")
        [(stored,)] = cursor.fetchall()
    assert USER_KEY not in stored

    plan = plan_for(alice)
    plan.monthly_token_quota = 10
    plan.save()  # BYOK calls do not use up the quota
    model_server.script(prompt_tokens=500, completion_tokens=50)
    assert gateway.openai(openai_body()).status_code == 200
    assert model_server.requests[-1].headers["Authorization"] == f"Bearer {USER_KEY}"
    plan.monthly_token_quota = 1_000_000  # bob shares the plan; his call is operator-paid
    plan.save()
    bob_key = rotate_credential(bob.sandboxes.get())
    assert gateway.openai(openai_body(), key=bob_key).status_code == 200
    assert model_server.requests[-1].headers["Authorization"] == f"Bearer {OPERATOR_KEY}"
    mine, bobs = wait_for_records(2)
    assert (mine.user, mine.byok, bobs.user, bobs.byok) == (alice, True, bob, False)
    assert month_usage(alice)["byok_tokens"] == 550 and month_usage(alice)["tokens"] == 0

    client.post(reverse("provider-keys"), {"action": "delete", "provider": "openai"})
    assert not UserProviderKey.objects.filter(user=alice).exists()


def test_it_lists_models(gateway: Gateway, upstreams: dict[str, Upstream]) -> None:
    ModelRoute.objects.create(pattern="llama3.2", upstream=upstreams["openai"])
    auth = {"Authorization": f"Bearer {gateway.key}"}
    listed = gateway.http.get(f"{gateway.base}/ai/v1/models", headers=auth).json()
    assert {"gpt-4o-mini", "llama3.2"} <= {m["id"] for m in listed["data"]}
    assert "claude-*" not in {m["id"] for m in listed["data"]}
    assert gateway.http.get(f"{gateway.base}/ai/v1/models").status_code == 401


def test_it_serves_only_the_gateway_to_sandboxes(ai_gateway_server: Any) -> None:
    with httpx.Client(base_url=ai_gateway_server.url) as http:
        for path in ["/", "/admin/", "/accounts/login/", "/dashboard/", "/settings/keys/"]:
            assert http.get(path).status_code == 404, path
        assert http.get("/ai/v1/models").status_code == 401


def test_it_keeps_keys_out_of_logs(gateway: Gateway, model_server: FakeModelServer,
                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    gateway.openai(openai_body())
    gateway.openai(openai_body(), key="hmk_wrong")
    model_server.script(status=500)
    gateway.anthropic(anthropic_body())
    # Two records: the wrong key's call is refused before it is anyone's. Each record's log
    # line is written before the record is saved.
    assert len(wait_for_records(2)) == 2
    text = caplog.text
    assert "ai call" in text
    for secret in [gateway.key, OPERATOR_KEY, "hmk_wrong"]:
        assert secret not in text


def test_it_is_mounted_in_the_portal_too(client: Any, gateway: Gateway) -> None:
    response = client.get("/ai/v1/models", HTTP_AUTHORIZATION=f"Bearer {gateway.key}")
    assert response.status_code == 200


def test_it_shows_this_months_usage_on_the_dashboard(client: Any, alice: Any) -> None:
    sandbox = alice.sandboxes.get()
    UsageRecord.objects.create(user=alice, sandbox=sandbox, api="openai", model="gpt-4o-mini",
                               input_tokens=200_000, output_tokens=50_000, cost=Decimal("0.06"),
                               status_code=200, outcome="ok")  # fmt: skip
    client.force_login(alice)
    page = client.get(reverse("dashboard")).content.decode()
    assert 'id="ai-usage"' in page
    assert "250,000 of 1,000,000 (25%)" in page
    assert "$0.0600" in page


def test_it_serves_only_priced_models_on_the_operator_key(
    gateway: Gateway, model_server: FakeModelServer
) -> None:
    openai = gateway.openai(openai_body(model="o1-pro"))
    assert openai.status_code == 404
    error = openai.json()["error"]
    assert error["code"] == "model_not_found" and "'o1-pro' is not available" in error["message"]
    anthropic = gateway.anthropic(anthropic_body(model="claude-opus-4-1"))
    assert anthropic.status_code == 200  # priced by the "claude-*" glob of this fixture
    Price.objects.filter(model="claude-*").delete()
    anthropic = gateway.anthropic(anthropic_body(model="claude-opus-4-1"))
    assert anthropic.status_code == 404
    assert anthropic.json()["error"]["type"] == "not_found_error"
    assert [r.json["model"] for r in model_server.requests] == ["claude-opus-4-1"]
    assert gateway.openai(openai_body()).status_code == 200


def test_it_seeds_prices_for_the_default_models(settings: Any) -> None:
    from importlib import import_module

    from django.apps import apps

    Price.objects.all().delete()
    import_module("ai_gateway.migrations.0003_seed_prices").seed(apps, None)
    mini = Price.objects.get(model=settings.HERMIT_DEFAULT_MODEL)
    assert (mini.input_per_million, mini.output_per_million) == (Decimal("0.15"), Decimal("0.6"))
    assert Price.objects.filter(model__startswith="claude-sonnet-4-5").exists()
    assert not Price.objects.filter(model__contains="*").exists()  # exact names only


def test_it_counts_the_quota_in_money(gateway: Gateway, model_server: FakeModelServer,
                                      alice: Any) -> None:  # fmt: skip
    plan = plan_for(alice)
    plan.monthly_spend_limit, plan.monthly_token_quota = Decimal("0.05"), 0
    plan.save()
    # 3,000 input + 1,000 output on claude-* ($3 / $15 a million) = $0.024 a call.
    model_server.script(prompt_tokens=3000, completion_tokens=1000)
    body = {**anthropic_body(), "max_tokens": 1000}
    assert gateway.anthropic(body).status_code == 200
    assert gateway.anthropic(body).status_code == 200  # $0.048 spent
    refused = gateway.anthropic(body)
    assert refused.status_code == 429
    message = refused.json()["error"]["message"]
    assert "monthly spend limit reached: $0.05 of $0.05" in message
    assert len(model_server.requests) == 2
    assert month_usage(alice)["cost"] == Decimal("0.048")


def test_it_refuses_unlisted_betas_and_provider_tools(
    gateway: Gateway, model_server: FakeModelServer, settings: Any
) -> None:
    headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    url = f"{gateway.base}/ai/v1/messages"
    betas = "prompt-caching-2024-07-31,context-1m-2025-08-07"
    beta = gateway.http.post(
        url, json=anthropic_body(), headers={**headers, "anthropic-beta": betas}
    )
    assert beta.status_code == 400
    assert "'context-1m-2025-08-07' is not allowed" in beta.json()["error"]["message"]
    search = {**anthropic_body(), "tools": [
        {"name": "get_time", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}  # fmt: skip
    refused = gateway.http.post(url, json=search, headers=headers)
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "invalid_request_error"
    assert "'web_search_20250305' is not available" in refused.json()["error"]["message"]
    openai = gateway.openai(openai_body(web_search_options={}))
    assert openai.status_code == 400 and "'web_search'" in openai.json()["error"]["message"]
    assert model_server.requests == []

    allowed = gateway.http.post(url, json=anthropic_body(), headers={
        **headers, "anthropic-beta": "prompt-caching-2024-07-31"})  # fmt: skip
    assert allowed.status_code == 200
    assert model_server.requests[-1].headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    settings.HERMIT_AI_SERVER_TOOLS = ["web_search_*"]
    assert gateway.http.post(url, json=search, headers=headers).status_code == 200


def test_it_checks_a_users_key_before_saving_it(client: Any, gateway: Gateway,
                                               model_server: FakeModelServer,
                                               alice: Any) -> None:  # fmt: skip
    model_server.api_keys = {OPERATOR_KEY, USER_KEY, "sk-ant-alice-good-key"}
    client.force_login(alice)
    url = reverse("provider-keys")
    for provider in ("openai", "anthropic"):
        page = client.post(url, {"provider": provider, "api_key": "sk-made-up-cccccccccccc"})
        assert page.status_code == 200
        assert (
            "fake-" in page.content.decode() and "refused this key (401)" in page.content.decode()
        )
    compatible = client.post(url, {"provider": "openai-compatible", "api_key": "anything-goes"})
    assert "no upstream for this provider that takes your own keys" in compatible.content.decode()
    assert not UserProviderKey.objects.exists()
    assert client.post(url, {"provider": "openai", "api_key": USER_KEY}).status_code == 302
    assert client.post(url, {"provider": "anthropic",
                             "api_key": "sk-ant-alice-good-key"}).status_code == 302  # fmt: skip
    assert UserProviderKey.objects.filter(user=alice).count() == 2
    checks = [r for r in model_server.requests if r.path.endswith("/models")]
    assert checks[-1].headers["x-api-key"] == "sk-ant-alice-good-key"


def test_it_uses_the_operator_key_where_user_keys_are_not_taken(
    gateway: Gateway, model_server: FakeModelServer, upstreams: dict[str, Upstream], alice: Any
) -> None:
    """An OpenAI-compatible server may ignore keys: a saved key must not make calls free."""
    local = make_upstream(model_server, "openai-compatible", "local-llm", key="")
    ModelRoute.objects.create(pattern="gpt-4o-mini", upstream=local)
    UserProviderKey.objects.create(user=alice, provider="openai-compatible", api_key="made-up",
                                   hint="…up")  # fmt: skip
    model_server.script(prompt_tokens=100, completion_tokens=10)
    assert gateway.openai(openai_body()).status_code == 200
    assert "Authorization" not in model_server.requests[-1].headers
    [row] = wait_for_records(1)
    assert (row.byok, row.upstream, row.input_tokens) == (False, local, 100)
    assert month_usage(alice)["tokens"] == 110


def test_it_refuses_a_deactivated_users_key(gateway: Gateway, model_server: FakeModelServer,
                                            alice: Any) -> None:  # fmt: skip
    alice.is_active = False
    alice.save()
    openai = gateway.openai(openai_body())
    assert openai.status_code == 403
    assert "deactivated" in openai.json()["error"]["message"]
    anthropic = gateway.anthropic(anthropic_body())
    assert (anthropic.status_code, anthropic.json()["error"]["type"]) == (403, "permission_error")
    auth = {"Authorization": f"Bearer {gateway.key}"}
    assert gateway.http.get(f"{gateway.base}/ai/v1/models", headers=auth).status_code == 403
    assert model_server.requests == []


def test_it_quotes_the_model_name_in_logs(gateway: Gateway, caplog: pytest.LogCaptureFixture,
                                          upstreams: dict[str, Upstream]) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    forged = "nope\n2026-01-01 INFO ai_gateway.proxy: ai call user=1 outcome=ok"
    ModelRoute.objects.create(pattern="nope*", upstream=upstreams["openai"])
    gateway.openai(openai_body(model=forged))
    wait_for_records(1)
    lines = caplog.text.splitlines()
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert any(repr(forged) in line for line in lines)


def test_it_refuses_a_key_that_only_shares_the_prefix(
    gateway: Gateway, model_server: FakeModelServer
) -> None:
    credential = SandboxCredential.objects.get()
    assert gateway.key.startswith(credential.prefix)
    forged = credential.prefix + "A" * (len(gateway.key) - len(credential.prefix))
    assert gateway.openai(openai_body(), key=forged).status_code == 401
    assert model_server.requests == []


def test_it_never_uses_a_disabled_upstream(gateway: Gateway, model_server: FakeModelServer,
                                           upstreams: dict[str, Upstream]) -> None:  # fmt: skip
    second = make_upstream(model_server, "openai", "second", key="sk-second-eeeeeeee")
    routed = make_upstream(model_server, "openai", "routed", key="sk-routed-ffffffff",
                           is_operator=False, enabled=False)  # fmt: skip
    ModelRoute.objects.create(pattern="gpt-*", upstream=routed)
    first = upstreams["openai"]
    first.enabled = False
    first.save()
    assert gateway.openai(openai_body()).status_code == 200
    assert model_server.requests[-1].headers["Authorization"] == "Bearer sk-second-eeeeeeee"
    second.enabled = False
    second.save()
    assert gateway.openai(openai_body()).status_code == 404
    assert len(model_server.requests) == 1


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_it_reads_usage_split_across_network_reads(
    gateway: Gateway, model_server: FakeModelServer, api: str
) -> None:
    model_server.script(prompt_tokens=777, completion_tokens=55, split_writes=True)
    send = gateway.openai if api == "openai" else gateway.anthropic
    response = send(openai_body() if api == "openai" else anthropic_body())
    assert response.status_code == 200 and "Hello" in response.text
    [row] = wait_for_records(1)
    assert (row.input_tokens, row.output_tokens) == (777, 55)


def test_it_keeps_provider_keys_out_of_reprs(alice: Any, upstreams: dict[str, Upstream]) -> None:
    from ai_gateway.upstreams import choose_targets

    UserProviderKey.objects.create(user=alice, provider="openai", api_key=USER_KEY, hint="sk-…bbbb")
    [target] = choose_targets(alice.pk, "openai", "gpt-4o-mini")
    assert target.api_key == USER_KEY
    shown = [repr(target), str(target), repr(upstreams["openai"]), str(upstreams["openai"]),
             repr(UserProviderKey.objects.get()), str(UserProviderKey.objects.get())]  # fmt: skip
    for text in shown:
        assert USER_KEY not in text and OPERATOR_KEY not in text


def test_it_caps_output_on_the_operator_key_at_what_it_reserved(
    gateway: Gateway, model_server: FakeModelServer, settings: Any
) -> None:
    settings.HERMIT_AI_DEFAULT_MAX_OUTPUT = 777
    assert gateway.openai(openai_body()).status_code == 200
    sent = model_server.requests[-1]
    assert sent.json["max_completion_tokens"] == 777 and "max_tokens" not in sent.json
    asked = gateway.openai(openai_body(max_tokens=50))
    assert asked.status_code == 200
    assert model_server.requests[-1].json["max_tokens"] == 50
    assert "max_completion_tokens" not in model_server.requests[-1].json


def test_it_refuses_what_costs_more_than_it_reserved_on_the_operator_key(
    gateway: Gateway, model_server: FakeModelServer
) -> None:
    many = gateway.openai(openai_body(n=8))
    assert many.status_code == 400 and "n=1" in many.json()["error"]["message"]
    priority = gateway.openai(openai_body(service_tier="priority"))
    assert priority.status_code == 400
    assert "'priority' is not available" in priority.json()["error"]["message"]
    fast = {**anthropic_body(), "service_tier": "priority"}
    assert gateway.anthropic(fast).json()["error"]["type"] == "invalid_request_error"
    text = gateway.openai(openai_body(stream="false"))  # type: ignore[arg-type]
    assert text.status_code == 400 and "'stream'" in text.json()["error"]["message"]
    assert model_server.requests == []
    assert gateway.openai(openai_body(service_tier="default")).status_code == 200


def test_it_sends_upstream_exactly_the_body_it_priced(
    gateway: Gateway, model_server: FakeModelServer
) -> None:
    # A duplicate key: Python reads the last "model", an upstream might read the first.
    raw = json.dumps(openai_body(model="gpt-4o-mini"))[:-1] + ', "model": "gpt-4o-mini"}'
    raw = raw.replace('"gpt-4o-mini"', '"o1-pro"', 1)
    response = gateway.http.post(
        f"{gateway.base}/ai/v1/chat/completions",
        content=raw,
        headers={"Authorization": f"Bearer {gateway.key}", "content-type": "application/json"},
    )
    assert response.status_code == 200
    sent = model_server.requests[-1]
    assert sent.json["model"] == "gpt-4o-mini"
    assert int(sent.headers["Content-Length"]) == len(json.dumps(sent.json).encode())
    assert int(sent.headers["Content-Length"]) != len(raw.encode())


def test_it_records_no_refusal_of_a_caller_without_a_key(gateway: Gateway) -> None:
    for _ in range(5):
        assert gateway.openai(openai_body(), key="hk-made-up").status_code == 401
    assert gateway.openai(openai_body(), key="").status_code == 401
    time.sleep(0.3)
    assert not UsageRecord.objects.exists()


def test_it_records_a_call_whose_figures_overflow_a_token_column(
    gateway: Gateway, model_server: FakeModelServer
) -> None:
    model_server.script(reply="big", chunks=1, prompt_tokens=5 * 10**9, completion_tokens=7)
    assert gateway.openai(openai_body()).status_code == 200
    [row] = wait_for_records(1)
    assert (row.outcome, row.input_tokens, row.output_tokens) == ("ok", 2**31 - 1, 7)
    assert row.cost > 0


def test_it_cuts_a_call_at_its_time_limit_and_bills_it(
    gateway: Gateway, model_server: FakeModelServer, settings: Any
) -> None:
    settings.HERMIT_AI_MAX_CALL_SECONDS = 1
    model_server.script(reply="a very slow answer indeed", chunks=20, delay=0.2)
    started = time.monotonic()
    response = gateway.openai(openai_body())
    assert response.status_code == 200 and time.monotonic() - started < 3
    [row] = wait_for_records(1)
    assert row.outcome == "error" and "time limit" in row.error
    assert row.output_tokens >= 4096 and row.cost > 0  # the reserved output: nothing slips by
