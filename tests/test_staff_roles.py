"""Staff roles: the "support" group sees everything but cannot delete or restore and never sees
a secret; the "operator" group can do everything but change plans' prices (or hand out
permissions)."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.urls import reverse

from ai_gateway.models import Upstream
from billing.models import Plan
from sandboxes import tasks
from sandboxes.backups import tasks as backup_tasks
from sandboxes.models import AccountDeletion, Sandbox, Snapshot
from sandboxes.roles import OPERATOR, SUPPORT
from tests.factories import make_user
from tests.mfa import enroll_totp

pytestmark = pytest.mark.django_db
OPERATOR_KEY = "sk-operator-secret-abcdefghijklmnop"


def member_of(group: str, email: str) -> Any:
    user = make_user(email, is_staff=True)
    user.groups.add(Group.objects.get(name=group))
    enroll_totp(user)
    return user


def codenames(group: str) -> set[str]:
    perms = Group.objects.get(name=group).permissions.select_related("content_type")
    return {f"{p.content_type.app_label}.{p.codename}" for p in perms}


def test_it_creates_the_groups_with_their_permissions() -> None:
    support, operator = codenames(SUPPORT), codenames(OPERATOR)
    assert {"sandboxes.view_sandbox", "auth.view_user", "ai_gateway.view_upstream"} <= support
    assert {"sandboxes.operate_sandbox", "sandboxes.suspend_user"} <= support
    assert not {p for p in support if ".delete_" in p or ".change_" in p or ".add_" in p}
    assert not support & {
        "sandboxes.restore_sandbox", "sandboxes.delete_account", "sandboxes.view_secrets"
    }  # fmt: skip
    assert {
        "sandboxes.restore_sandbox", "sandboxes.delete_account", "sandboxes.view_secrets",
        "billing.change_plan", "auth.change_user", "ai_gateway.change_upstream",
    } <= operator  # fmt: skip
    assert not operator & {"billing.change_plan_price", "auth.change_group", "auth.add_permission"}


def test_it_refuses_support_restores_and_deletions(client: Client, alice: Any) -> None:
    support = member_of(SUPPORT, "help@example.com")
    sandbox = Sandbox.objects.get(owner=alice)
    snapshot = Snapshot.objects.create(
        sandbox=sandbox, restic_id="ab" * 32, taken_at=sandbox.created_at
    )
    client.force_login(support)
    listing = client.get(reverse("admin:sandboxes_sandbox_changelist")).content.decode()
    assert 'value="stop"' in listing and 'value="back_up"' in listing
    assert 'value="restore_snapshot"' not in listing
    with mock.patch.object(backup_tasks.restore_sandbox, "delay") as restore:
        client.post(
            reverse("admin:sandboxes_sandbox_changelist"),
            {"action": "restore_snapshot", "_selected_action": [sandbox.pk], "apply": "yes",
             "snapshot": snapshot.pk},
        )  # fmt: skip
    assert not restore.called
    assert not sandbox.events.filter(kind="restore-requested").exists()

    users = client.get(reverse("admin:auth_user_changelist")).content.decode()
    assert 'value="delete_account"' not in users and 'value="suspend"' in users
    with mock.patch.object(tasks.stop_sandbox, "delay") as stop:
        client.post(
            reverse("admin:auth_user_changelist"),
            {"action": "delete_account", "_selected_action": [alice.pk], "apply": "yes",
             "confirm": "on"},
        )  # fmt: skip
    assert not stop.called and not AccountDeletion.objects.exists()
    alice.refresh_from_db()
    assert alice.is_active
    for name, pk in (("admin:billing_plan_delete", Plan.objects.first().pk),  # type: ignore[union-attr]
                     ("admin:sandboxes_snapshot_delete", snapshot.pk)):  # fmt: skip
        try:
            url = reverse(name, args=[pk])
        except Exception:
            continue  # not in the admin at all
        assert client.post(url, {"post": "yes"}).status_code == 403
    assert Plan.objects.exists()


def test_it_never_shows_support_a_secret(client: Client, alice: Any) -> None:
    support = member_of(SUPPORT, "help@example.com")
    upstream = Upstream.objects.create(
        name="operator-openai", provider="openai-compatible", base_url="https://api.test/v1",
        api_key=OPERATOR_KEY, is_operator=True,
    )  # fmt: skip
    sandbox = Sandbox.objects.get(owner=alice)
    totp = enroll_totp(alice)
    client.force_login(support)
    pages = [
        reverse("admin:ai_gateway_upstream_change", args=[upstream.pk]),
        reverse("admin:ai_gateway_upstream_changelist"),
        reverse("admin:sandboxes_sandbox_change", args=[sandbox.pk]),
        reverse("admin:auth_user_change", args=[alice.pk]),
        reverse("admin:mfa_authenticator_change", args=[alice.authenticator_set.get().pk]),
    ]
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        page = response.content.decode()
        for secret in (OPERATOR_KEY, sandbox.gateway_token, totp):
            assert secret not in page, (url, secret)
    assert "operator-openai" in client.get(pages[0]).content.decode()  # sees the rest


def test_it_lets_operators_do_all_but_change_prices(client: Client, alice: Any) -> None:
    operator = member_of(OPERATOR, "ops@example.com")
    plan = Plan.objects.get(slug="free")
    client.force_login(operator)
    url = reverse("admin:billing_plan_change", args=[plan.pk])
    page = client.get(url).content.decode()
    assert 'name="requests_per_minute"' in page and 'name="price_monthly"' not in page
    users = client.get(reverse("admin:auth_user_changelist")).content.decode()
    assert 'value="delete_account"' in users
    listing = client.get(reverse("admin:sandboxes_sandbox_changelist")).content.decode()
    assert 'value="restore_snapshot"' in listing
    user_page = client.get(reverse("admin:auth_user_change", args=[alice.pk])).content.decode()
    assert 'name="is_staff"' in user_page and 'name="is_superuser"' not in user_page
    assert 'name="groups"' not in user_page
