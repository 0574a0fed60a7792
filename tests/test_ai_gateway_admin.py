"""Staff pages of the AI gateway: every registered model's list, add and change pages load, and
no page, form or repr shows a provider key."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse

from ai_gateway.credentials import rotate_credential
from ai_gateway.models import (
    ModelRoute,
    Price,
    SandboxCredential,
    SpendCounter,
    Upstream,
    UsageRecord,
    UserProviderKey,
)

pytestmark = pytest.mark.django_db

OPERATOR_KEY = "sk-operator-secret-1111111111"
USER_KEY = "sk-user-secret-2222222222"


@pytest.fixture
def rows(alice: Any) -> dict[type, Any]:
    upstream = Upstream.objects.create(
        name="openai", provider="openai", base_url="https://api.openai.com/v1", api_key=OPERATOR_KEY
    )
    rotate_credential(alice.sandboxes.get())
    return {
        Upstream: upstream,
        ModelRoute: ModelRoute.objects.create(pattern="gpt-*", upstream=upstream),
        Price: Price.objects.update_or_create(
            model="gpt-test", defaults={"input_per_million": Decimal(1)}
        )[0],
        SandboxCredential: SandboxCredential.objects.get(),
        UserProviderKey: UserProviderKey.objects.create(
            user=alice, provider="openai", api_key=USER_KEY, hint="sk-…2222"
        ),
        UsageRecord: UsageRecord.objects.create(
            user=alice, api="openai", model="gpt-test", outcome="ok"
        ),
        SpendCounter: SpendCounter.objects.create(user=alice, month="2026-01-01"),
    }


def gateway_models() -> list[type]:
    return [m for m in admin.site._registry if m._meta.app_label == "ai_gateway"]


def test_every_gateway_model_is_covered(rows: dict[type, Any]) -> None:
    assert set(gateway_models()) == set(rows)


def test_it_loads_every_gateway_admin_page(
    client: Client, staff: Any, rows: dict[type, Any]
) -> None:
    client.force_login(staff)
    for model, obj in rows.items():
        name = f"admin:ai_gateway_{model._meta.model_name}"
        pages = [reverse(f"{name}_changelist"), reverse(f"{name}_change", args=[obj.pk])]
        if admin.site._registry[model].has_add_permission(_request(staff)):
            pages.append(reverse(f"{name}_add"))
        for url in pages:
            page = client.get(url)
            assert page.status_code == 200, url
            text = page.content.decode()
            assert OPERATOR_KEY not in text and USER_KEY not in text, url
        assert client.get(reverse(f"{name}_changelist"), {"q": "alice"}).status_code == 200


def test_it_keeps_the_upstream_key_when_the_form_leaves_it_empty(
    client: Client, staff: Any, rows: dict[type, Any]
) -> None:
    client.force_login(staff)
    upstream = rows[Upstream]
    url = reverse("admin:ai_gateway_upstream_change", args=[upstream.pk])
    form = client.get(url).content.decode()
    assert 'name="api_key"' in form and OPERATOR_KEY not in form
    data = {
        "name": "openai",
        "provider": "openai",
        "base_url": upstream.base_url,
        "api_key": "",
        "is_operator": "on",
        "enabled": "on",
        "timeout_seconds": "120",
    }
    assert client.post(url, data).status_code == 302
    upstream.refresh_from_db()
    assert upstream.api_key == OPERATOR_KEY and not upstream.accepts_user_keys
    for text in (repr(upstream), str(upstream), repr(rows[UserProviderKey])):
        assert OPERATOR_KEY not in text and USER_KEY not in text


def _request(user: Any) -> Any:
    from django.test import RequestFactory

    request = RequestFactory().get("/")
    request.user = user
    return request
