"""Deleting an account cancels its Stripe subscription at once, and keeps trying until Stripe
has: the user can no longer sign in to cancel it. The real stripe SDK talks to the local fake
Stripe API; agents are on the in-memory fake backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.template.loader import render_to_string
from django.test import Client
from django.urls import reverse

from billing.models import Account, PlanChange
from billing.tasks import reconcile_subscriptions
from sandboxes import accounts, tasks
from sandboxes.models import Sandbox
from tests.factories import PASSWORD, make_user
from tests.fakes.stripe_api import FakeStripe
from tests.fixtures.stripe import deliver, sell_plan

pytestmark = pytest.mark.django_db


@pytest.fixture
def eager(settings: Any) -> Iterator[None]:
    """Tasks run inline; the agents' stops are left out (tests/test_suspend_delete.py)."""
    from portal.celery import app

    settings.SANDBOX_BACKEND = "fake"
    settings.HERMIT_DELETE_GRACE_DAYS = 14
    was = app.conf.task_always_eager
    app.conf.task_always_eager = True
    with mock.patch.object(tasks.stop_sandbox, "delay"):
        yield
    app.conf.task_always_eager = was


def subscribed(client: Client, stripe_api: FakeStripe, email: str, capture: Any) -> Any:
    """A user on Pro through Stripe, every webhook applied."""
    sell_plan(stripe_api, "pro")
    user = make_user(email)
    Sandbox.objects.filter(owner=user).update(backend="fake")
    client.force_login(user)
    session_id = client.post("/billing/upgrade/", {"plan": "pro"})["Location"].rsplit("/", 1)[1]
    stripe_api.pay(session_id)
    with capture(execute=True):
        assert set(deliver(client, stripe_api.take())) == {200}
    assert Account.objects.get(user=user).plan.slug == "pro"
    mail.outbox.clear()
    return user


def test_it_cancels_the_subscription_at_stripe_when_the_user_deletes_their_account(
    client: Client,
    stripe_api: FakeStripe,
    eager: None,
    django_capture_on_commit_callbacks: Any,
) -> None:
    user = subscribed(client, stripe_api, "leaving@example.com", django_capture_on_commit_callbacks)
    [subscription_id] = stripe_api.subscriptions
    page = client.get(reverse("account-delete")).content.decode()
    assert 'id="subscription-cancel-notice"' in page
    assert "Your Pro subscription is cancelled at once" in page
    assert render_to_string("billing/_deletion_notice.html", {"user": make_user("b@x.test")}) == (
        "\n"
    )

    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("account-delete"), {"password": PASSWORD})

    assert stripe_api.subscriptions[subscription_id]["status"] == "canceled"
    [cancel] = [(path, p) for m, path, p in stripe_api.requests if m == "DELETE"]
    assert cancel == (
        f"/v1/subscriptions/{subscription_id}",
        {"invoice_now": "false", "prorate": "false"},
    )
    account = Account.objects.select_related("plan").get(user=user)
    assert account.plan.slug == "free" and account.cancel_requested_at is None
    assert account.subscription_status == "canceled"
    change = PlanChange.objects.filter(account=account).first()
    assert change is not None and change.source == PlanChange.Source.DELETION
    assert subscription_id in change.reason
    assert [m.subject for m in mail.outbox] == ["[Hermit] Your Pro subscription was cancelled"]

    # Stripe's deletion event that follows changes nothing more; neither does a second run.
    with django_capture_on_commit_callbacks(execute=True):
        assert deliver(client, stripe_api.take()) == [200]
    assert reconcile_subscriptions() == 0
    assert PlanChange.objects.filter(account=account).count() == 2 and len(mail.outbox) == 1


def test_it_retries_the_cancellation_from_the_reconcile_task_until_stripe_answers(
    client: Client,
    stripe_api: FakeStripe,
    eager: None,
    staff: Any,
    django_capture_on_commit_callbacks: Any,
    caplog: Any,
) -> None:
    user = subscribed(
        client, stripe_api, "staffgone@example.com", django_capture_on_commit_callbacks
    )
    [subscription_id] = stripe_api.subscriptions
    stripe_api.failing["/v1/subscriptions"] = 4  # Stripe is down: the task and a first retry

    with django_capture_on_commit_callbacks(execute=True):
        accounts.request_deletion(user, by=staff)
    assert stripe_api.subscriptions[subscription_id]["status"] == "active"
    assert Account.objects.get(user=user).cancel_requested_at is not None
    assert "deleted, subscription not cancelled yet" in caplog.text

    assert reconcile_subscriptions() == 0  # still down
    assert Account.objects.get(user=user).cancel_requested_at is not None
    assert stripe_api.subscriptions[subscription_id]["status"] == "active"

    assert reconcile_subscriptions() == 1
    assert stripe_api.subscriptions[subscription_id]["status"] == "canceled"
    account = Account.objects.select_related("plan").get(user=user)
    assert account.cancel_requested_at is None and account.plan.slug == "free"
    assert reconcile_subscriptions() == 0


def test_it_has_nothing_to_cancel_for_a_user_who_never_paid(
    stripe_api: FakeStripe, eager: None, django_capture_on_commit_callbacks: Any
) -> None:
    user = make_user("free@example.com")
    with django_capture_on_commit_callbacks(execute=True):
        accounts.request_deletion(user, by=user)
    assert Account.objects.get(user=user).cancel_requested_at is None
    assert not stripe_api.requests and not mail.outbox


def purge_at_once(user: Any, settings: Any, capture: Any) -> None:
    """Delete with no grace period: the purge runs right after the cancellation task."""
    settings.HERMIT_DELETE_GRACE_DAYS = 0
    with capture(execute=True):
        accounts.request_deletion(user, by=user)
    assert not get_user_model().objects.filter(pk=user.pk).exists()


def test_it_cancels_once_more_as_the_purge_removes_the_account(
    client: Client,
    stripe_api: FakeStripe,
    eager: None,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
    caplog: Any,
) -> None:
    user = subscribed(client, stripe_api, "purged@example.com", django_capture_on_commit_callbacks)
    [subscription_id] = stripe_api.subscriptions
    stripe_api.failing["/v1/subscriptions"] = 2  # the task's try (and its retry) fails
    purge_at_once(user, settings, django_capture_on_commit_callbacks)
    assert stripe_api.subscriptions[subscription_id]["status"] == "canceled"
    assert f"subscriptions cancelled at Stripe: {subscription_id}" in caplog.text


def test_it_logs_an_error_for_staff_if_the_purge_cannot_cancel_either(
    client: Client,
    stripe_api: FakeStripe,
    eager: None,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
    caplog: Any,
) -> None:
    user = subscribed(client, stripe_api, "stuck@example.com", django_capture_on_commit_callbacks)
    [subscription_id] = stripe_api.subscriptions
    customer_id = Account.objects.get(user=user).stripe_customer_id
    stripe_api.failing["/v1/subscriptions"] = 4
    purge_at_once(user, settings, django_capture_on_commit_callbacks)
    assert stripe_api.subscriptions[subscription_id]["status"] == "active"
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert customer_id in error.getMessage() and "cancel them in Stripe" in error.getMessage()
    assert stripe_api.api_key not in caplog.text


def test_it_tells_staff_whose_subscription_a_deletion_cancels(alice: Any, bob: Any) -> None:
    Account.objects.filter(user=alice).update(
        stripe_customer_id="cus_alice",
        stripe_subscription_id="sub_alice",
        subscription_status="active",
    )
    notice = render_to_string("billing/_staff_deletion_notice.html", {"users": [alice, bob]})
    assert "Their Stripe subscriptions are cancelled at once (alice@" in notice
    assert "bob@" not in notice and "issue any refund in Stripe" in notice
    assert render_to_string("billing/_staff_deletion_notice.html", {"users": [bob]}).strip() == ""


def test_it_names_the_subscriptions_on_the_staff_delete_confirmation(
    client: Client, staff: Any, alice: Any, bob: Any
) -> None:
    Account.objects.filter(user=alice).update(
        stripe_customer_id="cus_alice",
        stripe_subscription_id="sub_alice",
        subscription_status="active",
    )
    client.force_login(staff)
    page = client.post(
        reverse("admin:auth_user_changelist"),
        {"action": "delete_account", "_selected_action": [alice.pk, bob.pk]},
    ).content.decode()
    assert 'id="account-action-form"' in page
    assert 'id="subscription-cancel-notice"' in page and "(alice@" in page
    suspend = client.post(
        reverse("admin:auth_user_changelist"),
        {"action": "suspend", "_selected_action": [alice.pk]},
    ).content.decode()
    assert 'id="subscription-cancel-notice"' not in suspend
