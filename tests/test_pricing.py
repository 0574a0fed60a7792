"""The pricing page, the Upgrade and Manage billing buttons, and plans changed by staff.

Checkout and the portal run against the local fake Stripe API through the real stripe SDK.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from billing import pricing
from billing.models import Account, Plan, PlanChange
from tests.factories import make_user
from tests.fakes.stripe_api import FakeStripe
from tests.fixtures.stripe import sell_plan

pytestmark = pytest.mark.django_db


def test_it_lists_the_public_plans_from_their_rows_to_anyone(client: Any) -> None:
    Plan.objects.create(
        slug="team",
        name="Team",
        public=True,
        sleeps=False,
        price_monthly=Decimal("29.50"),
        monthly_token_quota=50_000_000,
        memory_mb=4096,
        cpu_millis=4000,
        internet=True,
        backup_interval=timedelta(hours=6),
        backup_keep_last=4,
        backup_keep_daily=14,
    )
    Plan.objects.create(slug="internal", name="Internal staff plan", public=False)

    response = client.get("/pricing/")
    assert response.status_code == 200
    page = response.content.decode()
    for text in [
        'id="plan-free"',
        'id="plan-pro"',
        'id="plan-team"',
        "Sleeps when idle, wakes in about a second",
        "Always on",
        "$12 / month",
        "$29.50 / month",
        "1M a month",
        "20M a month",
        "50M a month",
        "up to $1.00 a month",
        "1.5 GB",
        "4 GB",
        "1 core",
        "4 cores",
        "Daily, keeping 7 daily",
        "Hourly, keeping the last 24, 7 daily and 4 weekly",
        "Every 6 hours, keeping the last 4 and 14 daily",
        "No (model calls only)",
        "Yes: its own Chromium, with 1 GB more memory",  # pro
        "Sign up to upgrade",
    ]:
        assert text in page, text
    assert "Internal staff plan" not in page
    # Cheapest first.
    assert page.index('id="plan-free"') < page.index('id="plan-pro"') < page.index('id="plan-team"')


def test_it_shows_the_pricing_page_without_writing_an_account(client: Any, alice: Any) -> None:
    Account.objects.filter(user=alice).delete()
    client.force_login(alice)
    page = client.get("/pricing/").content.decode()
    assert 'class="card plan current" id="plan-free"' in page  # the default plan is theirs
    assert not Account.objects.filter(user=alice).exists()


def test_it_links_the_pricing_page_from_home_and_the_dashboard(client: Any, alice: Any) -> None:
    assert 'href="/pricing/"' in client.get("/").content.decode()
    client.force_login(alice)
    dashboard = client.get("/dashboard/").content.decode()
    assert 'href="/pricing/"' in dashboard
    assert '<span id="plan-name">Free</span><span id="plan-policy">, sleeps when idle</span>' in (
        dashboard
    )


def test_it_says_billing_is_not_set_up_without_stripe_keys(
    client: Any, alice: Any, settings: Any
) -> None:
    settings.STRIPE_SECRET_KEY = ""
    Plan.objects.filter(slug="pro").update(stripe_price_id="price_unused")
    client.force_login(alice)
    page = client.get("/pricing/").content.decode()
    assert "Billing is not set up" in page and "Upgrade to Pro" not in page

    response = client.post("/billing/upgrade/", {"plan": "pro"}, follow=True)
    assert response.redirect_chain == [("/pricing/", 302)]
    assert "Billing is not set up on this site yet" in response.content.decode()
    response = client.post("/billing/manage/", follow=True)
    assert "Billing is not set up on this site yet" in response.content.decode()
    assert Account.objects.get(user=alice).plan.slug == "free"


def test_it_lets_staff_change_a_plan_in_the_admin_and_records_it(
    client: Any, staff: Any, alice: Any, django_capture_on_commit_callbacks: Any
) -> None:
    account = Account.objects.get(user=alice)
    pro = Plan.objects.get(slug="pro")
    client.force_login(staff)
    url = f"/admin/billing/account/{account.pk}/change/"
    assert client.get(url).status_code == 200
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(
            url,
            {
                "user": alice.pk,
                "plan": pro.pk,
                "plan_changes-TOTAL_FORMS": "0",
                "plan_changes-INITIAL_FORMS": "0",
                "plan_changes-MIN_NUM_FORMS": "0",
                "plan_changes-MAX_NUM_FORMS": "1000",
            },
        )
    assert response.status_code == 302, response.content.decode()[-2000:]
    assert len(callbacks) == 1  # the agent's apply_plan, queued once the change commits
    account.refresh_from_db()
    assert account.plan == pro
    change = PlanChange.objects.get(account=account)
    assert (change.from_plan.slug, change.to_plan.slug) == ("free", "pro")
    assert change.source == PlanChange.Source.STAFF and change.actor == staff
    assert "Changed in the admin" in client.get(url).content.decode()

    # Saving the account again without touching its plan records nothing.
    client.post(
        url,
        {
            "user": alice.pk,
            "plan": pro.pk,
            "plan_changes-TOTAL_FORMS": "1",
            "plan_changes-INITIAL_FORMS": "1",
            "plan_changes-MIN_NUM_FORMS": "0",
            "plan_changes-MAX_NUM_FORMS": "1000",
            "plan_changes-0-id": change.pk,
            "plan_changes-0-account": account.pk,
        },
    )
    assert PlanChange.objects.count() == 1


def test_it_refuses_a_staff_plan_change_for_a_user_who_pays_through_stripe(
    client: Any, staff: Any, alice: Any
) -> None:
    account = Account.objects.get(user=alice)
    pro, free = Plan.objects.get(slug="pro"), Plan.objects.get(slug="free")
    Account.objects.filter(pk=account.pk).update(
        plan=pro,
        stripe_customer_id="cus_alice",
        stripe_subscription_id="sub_alice",
        subscription_status="active",
    )
    client.force_login(staff)
    url = f"/admin/billing/account/{account.pk}/change/"
    form = {
        "user": alice.pk,
        "plan": free.pk,
        "plan_changes-TOTAL_FORMS": "0",
        "plan_changes-INITIAL_FORMS": "0",
        "plan_changes-MIN_NUM_FORMS": "0",
        "plan_changes-MAX_NUM_FORMS": "1000",
    }
    response = client.post(url, form)
    assert response.status_code == 200
    assert "change it in Stripe" in response.content.decode()
    assert Account.objects.get(pk=account.pk).plan == pro
    assert not PlanChange.objects.exists()

    # Saving without touching the plan still works; so does a change once the subscription
    # has ended.
    assert client.post(url, {**form, "plan": pro.pk}).status_code == 302
    Account.objects.filter(pk=account.pk).update(subscription_status="canceled")
    assert client.post(url, form).status_code == 302
    assert Account.objects.get(pk=account.pk).plan == free
    assert PlanChange.objects.get().source == PlanChange.Source.STAFF


def test_it_creates_a_customer_and_a_checkout_session_through_the_sdk(
    client: Any, stripe_api: FakeStripe, alice: Any
) -> None:
    price_id = sell_plan(stripe_api, "pro")
    client.force_login(alice)
    page = client.get("/pricing/").content.decode()
    assert "Upgrade to Pro" in page

    response = client.post("/billing/upgrade/", {"plan": "pro"})
    assert response.status_code == 302
    calls = [(method, path) for method, path, _ in stripe_api.requests]
    assert calls == [
        ("POST", "/v1/customers"),
        ("GET", "/v1/subscriptions"),  # Stripe, not the local row, says whether they subscribe
        ("POST", "/v1/checkout/sessions"),
    ]
    [customer] = stripe_api.customers.values()
    assert customer["email"] == "alice@example.com"
    assert customer["metadata"] == {"hermit_user_id": str(alice.pk)}
    account = Account.objects.get(user=alice)
    assert account.stripe_customer_id == customer["id"]
    [session] = stripe_api.sessions.values()
    assert response["Location"] == session["url"]
    assert session["mode"] == "subscription" and session["_price"] == price_id
    assert session["customer"] == customer["id"]
    assert session["client_reference_id"] == str(alice.pk)
    assert session["metadata"] == {"hermit_user_id": str(alice.pk), "hermit_plan": "pro"}
    assert session["success_url"] == "http://testserver/dashboard/?checkout=success"
    assert session["cancel_url"] == "http://testserver/pricing/?checkout=cancelled"
    _, _, params = stripe_api.requests[2]
    assert params["line_items"] == [{"price": price_id, "quantity": "1"}]

    # A second try reuses the customer; the plan has not changed (Stripe has not confirmed).
    client.post("/billing/upgrade/", {"plan": "pro"})
    assert len(stripe_api.customers) == 1 and len(stripe_api.sessions) == 2
    assert Account.objects.get(user=alice).plan.slug == "free"
    cancelled = client.get("/pricing/?checkout=cancelled").content.decode()
    assert "nothing was charged" in cancelled


def test_it_refuses_a_second_checkout_while_stripe_has_a_subscription_the_webhook_did_not_bring(
    client: Any, stripe_api: FakeStripe, alice: Any
) -> None:
    """Paid, but no webhook has arrived yet: the row still says free, Stripe does not."""
    sell_plan(stripe_api, "pro")
    client.force_login(alice)
    response = client.post("/billing/upgrade/", {"plan": "pro"})
    stripe_api.pay(response["Location"].rsplit("/", 1)[1])
    assert stripe_api.outbox  # the webhooks wait: not delivered
    assert Account.objects.get(user=alice).plan.slug == "free"

    response = client.post("/billing/upgrade/", {"plan": "pro"}, follow=True)
    assert response.redirect_chain == [("/dashboard/", 302)]
    page = response.content.decode()
    assert "You already have a subscription, or a payment for one is going through" in page
    assert 'id="manage-billing"' in page
    assert len(stripe_api.sessions) == 1 and len(stripe_api.subscriptions) == 1
    _, path, params = stripe_api.requests[-1]
    customer_id = Account.objects.get(user=alice).stripe_customer_id
    assert (path, params) == ("/v1/subscriptions", {"customer": customer_id, "status": "all"})

    # A subscription whose first payment is still incomplete blocks a new Checkout too; one
    # that was cancelled does not.
    [subscription] = stripe_api.subscriptions.values()
    subscription["status"] = "incomplete"
    assert client.post("/billing/upgrade/", {"plan": "pro"})["Location"] == "/dashboard/"
    subscription["status"] = "canceled"
    response = client.post("/billing/upgrade/", {"plan": "pro"})
    assert response["Location"].startswith(f"{stripe_api.url}/c/pay/")


def test_it_creates_one_stripe_customer_per_user_even_when_asked_twice(
    stripe_api: FakeStripe, alice: Any
) -> None:
    """An answer lost on the way back (the id never stored) and a retry: the idempotency key
    gets the same customer back instead of a second one."""
    from billing import stripe_client

    first = stripe_client.create_customer(alice.email, alice.pk)
    again = stripe_client.create_customer(alice.email, alice.pk)
    other = stripe_client.create_customer("bob@example.com", alice.pk + 1)
    assert first == again != other
    assert len(stripe_api.customers) == 2


def test_it_refuses_upgrade_and_manage_billing_posts_without_a_csrf_token(
    stripe_api: FakeStripe, alice: Any
) -> None:
    from django.test import Client

    from billing import stripe_client

    sell_plan(stripe_api, "pro")
    customer_id = stripe_client.create_customer(alice.email, alice.pk)
    Account.objects.filter(user=alice).update(stripe_customer_id=customer_id)
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    before = len(stripe_api.requests)
    assert client.post("/billing/upgrade/", {"plan": "pro"}).status_code == 403
    assert client.post("/billing/manage/").status_code == 403
    assert len(stripe_api.requests) == before  # nothing reached Stripe

    client.get("/pricing/")  # the page sets the CSRF cookie; its forms carry the token
    token = client.cookies["csrftoken"].value
    response = client.post("/billing/upgrade/", {"plan": "pro", "csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response["Location"].startswith(stripe_api.url)


def test_it_shows_payment_pending_to_a_user_back_from_checkout_before_the_webhook(
    client: Any, stripe_api: FakeStripe, alice: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from tests.fixtures.stripe import deliver

    sell_plan(stripe_api, "pro")
    client.force_login(alice)
    response = client.post("/billing/upgrade/", {"plan": "pro"})
    stripe_api.pay(response["Location"].rsplit("/", 1)[1])
    back = client.get("/dashboard/?checkout=success").content.decode()
    assert 'id="billing-pending"' in back
    assert "Your plan changes as soon as Stripe confirms the payment" in back
    assert 'id="billing-pending"' not in client.get("/dashboard/").content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        assert set(deliver(client, stripe_api.take())) == {200}
    back = client.get("/dashboard/?checkout=success").content.decode()
    assert 'id="billing-pending"' not in back and '<span id="plan-name">Pro</span>' in back


def test_it_keeps_one_stripe_customer_to_one_account(alice: Any, bob: Any) -> None:
    from django.db import IntegrityError, transaction

    Account.objects.filter(user=alice).update(stripe_customer_id="cus_shared")
    assert Account.objects.filter(stripe_customer_id="").count() >= 1  # many without one
    with pytest.raises(IntegrityError), transaction.atomic():
        Account.objects.filter(user=bob).update(stripe_customer_id="cus_shared")
    assert Account.objects.get(user=bob).stripe_customer_id == ""


def test_it_refuses_plans_that_are_not_for_sale(
    client: Any, stripe_api: FakeStripe, alice: Any
) -> None:
    client.force_login(alice)
    Plan.objects.create(slug="hidden", name="Hidden", public=False, price_monthly=5)
    assert client.post("/billing/upgrade/", {"plan": "hidden"}).status_code == 404
    response = client.post("/billing/upgrade/", {"plan": "pro"}, follow=True)  # no price yet
    assert "Pro cannot be bought here" in response.content.decode()
    assert client.get("/billing/upgrade/").status_code == 405
    assert stripe_api.requests == []


def test_it_shows_stripe_errors_plainly_and_never_logs_keys(
    client: Any, stripe_api: FakeStripe, alice: Any, settings: Any, caplog: Any
) -> None:
    sell_plan(stripe_api, "pro")
    wrong_key = "sk_test_thisisnotthekey1234567890"
    settings.STRIPE_SECRET_KEY = wrong_key
    client.force_login(alice)
    with caplog.at_level(logging.DEBUG):
        response = client.post("/billing/upgrade/", {"plan": "pro"}, follow=True)
    page = response.content.decode()
    assert "Stripe could not be reached just now" in page
    assert wrong_key not in page and wrong_key[8:] not in caplog.text
    assert stripe_api.webhook_secret not in caplog.text
    assert "AuthenticationError (HTTP 401" in caplog.text
    assert Account.objects.get(user=alice).stripe_customer_id == ""


def test_it_opens_manage_billing_only_for_a_billing_account(
    client: Any, stripe_api: FakeStripe, alice: Any
) -> None:
    client.force_login(alice)
    response = client.post("/billing/manage/", follow=True)
    assert "You have no billing account yet" in response.content.decode()
    Account.objects.filter(user=alice).update(stripe_customer_id="cus_unknown")
    response = client.post("/billing/manage/", follow=True)
    assert "Stripe could not be reached just now" in response.content.decode()


def test_it_describes_plans_in_words() -> None:
    assert pricing.price(Decimal("0")) == "Free"
    assert pricing.price(Decimal("12.00")) == "$12 / month"
    assert pricing.tokens(0) == "Unlimited" and pricing.tokens(250_000) == "250k a month"
    assert pricing.memory(512) == "512 MB" and pricing.memory(2048) == "2 GB"
    assert pricing.cpu(500) == "0.5 core" and pricing.cpu(2000) == "2 cores"
    assert pricing.every(timedelta(minutes=30)) == "Every 30 minutes"
    assert pricing.every(timedelta(days=2)) == "Every 2 days"
    plan = Plan(backup_interval=None, backup_keep_last=0, backup_keep_daily=0)
    assert pricing.backups(plan) == "When it sleeps or stops"
    assert make_user("words@example.com").account.plan.sleep_policy == "sleeps when idle"


def test_it_expires_the_older_checkout_session_so_only_the_newest_can_be_paid(
    client: Any, stripe_api: FakeStripe, alice: Any
) -> None:
    """Upgrade pressed in two tabs: the first tab's Checkout can no longer be paid."""
    import httpx

    sell_plan(stripe_api, "pro")
    client.force_login(alice)
    first = client.post("/billing/upgrade/", {"plan": "pro"})["Location"]
    second = client.post("/billing/upgrade/", {"plan": "pro"})["Location"]
    first_id, second_id = first.rsplit("/", 1)[1], second.rsplit("/", 1)[1]
    assert first_id != second_id
    assert ("POST", f"/v1/checkout/sessions/{first_id}/expire", {}) in stripe_api.requests
    assert stripe_api.sessions[first_id]["status"] == "expired"
    assert Account.objects.get(user=alice).checkout_session_id == second_id

    page = httpx.get(first)
    assert page.status_code == 410 and 'id="pay"' not in page.text
    paid = httpx.post(first, follow_redirects=False)
    assert paid.status_code == 410 and not stripe_api.subscriptions
    with pytest.raises(ValueError):
        stripe_api.pay(first_id)

    assert 'id="pay"' in httpx.get(second).text
    stripe_api.pay(second_id)
    assert len(stripe_api.subscriptions) == 1

    # A session that is no longer open (paid) is not expired again: Stripe refuses that.
    Account.objects.filter(user=alice).update(checkout_session_id=second_id)
    from billing import stripe_client

    assert stripe_client.expire_checkout_session(second_id) is False
    assert stripe_api.sessions[second_id]["status"] == "complete"


def test_it_never_deletes_an_account_or_reassigns_its_user_in_the_admin(
    client: Any, staff: Any, alice: Any, bob: Any
) -> None:
    account = Account.objects.get(user=alice)
    staff.is_superuser = True  # even a superuser may not
    staff.save()
    client.force_login(staff)
    url = f"/admin/billing/account/{account.pk}/change/"
    page = client.get(url).content.decode()
    assert f"/admin/billing/account/{account.pk}/delete/" not in page
    assert 'name="user"' not in page  # shown, not editable
    assert 'name="checkout_session_id"' not in page and 'name="cancel_requested_at' not in page
    assert '<option value="">---------</option>' not in page.split('name="plan"')[1][:2000]
    assert client.get(f"/admin/billing/account/{account.pk}/delete/").status_code == 403
    changelist = client.get("/admin/billing/account/").content.decode()
    assert 'value="delete_selected"' not in changelist
    response = client.post(
        "/admin/billing/account/",
        {"action": "delete_selected", "_selected_action": [account.pk], "post": "yes"},
    )
    assert Account.objects.filter(pk=account.pk).exists()

    form = {
        "user": bob.pk,
        "plan": "",
        "plan_changes-TOTAL_FORMS": "0",
        "plan_changes-INITIAL_FORMS": "0",
        "plan_changes-MIN_NUM_FORMS": "0",
        "plan_changes-MAX_NUM_FORMS": "1000",
    }
    response = client.post(url, form)
    assert response.status_code == 200 and "This field is required." in response.content.decode()
    form["plan"] = str(Plan.objects.get(slug="pro").pk)
    assert client.post(url, form).status_code == 302
    account.refresh_from_db()
    assert account.user == alice and account.plan.slug == "pro"


def test_it_does_not_advertise_a_number_of_agents_it_does_not_enforce(client: Any) -> None:
    Plan.objects.filter(slug="pro").update(max_sandboxes=3)
    page = client.get("/pricing/").content.decode()
    plans = page.split('id="plans"')[1]
    assert 'id="plan-pro"' in plans
    assert "Agents" not in plans and "<dd>3</dd>" not in plans
    labels = [label for label, _ in pricing.describe(Plan.objects.get(slug="pro")).facts]
    assert "Agents" not in labels and "Memory" in labels


def test_it_shows_the_scheduled_move_to_free_after_a_cancellation(client: Any, alice: Any) -> None:
    import datetime as dt

    ends = dt.datetime(2027, 1, 5, 12, tzinfo=dt.UTC)
    Account.objects.filter(user=alice).update(
        plan=Plan.objects.get(slug="pro"),
        stripe_customer_id="cus_cancelling",
        stripe_subscription_id="sub_cancelling",
        subscription_status="active",
        cancel_at_period_end=True,
        current_period_end=ends,
    )
    client.force_login(alice)
    page = client.get("/pricing/").content.decode()
    free_card = page.split('id="plan-free"')[1].split("</section>")[0]
    assert "Your subscription is cancelled: your plan moves to Free on 5 January 2027." in free_card
    assert "Cancel your subscription under Manage billing" not in page

    Account.objects.filter(user=alice).update(cancel_at_period_end=False)
    page = client.get("/pricing/").content.decode()
    assert "Cancel your subscription under Manage billing to return to Free" in page
    assert "your plan moves to Free on" not in page


def test_it_links_plans_quietly_from_the_dashboard_when_billing_is_not_set_up(
    client: Any, alice: Any, settings: Any
) -> None:
    settings.STRIPE_SECRET_KEY = ""
    client.force_login(alice)
    dashboard = client.get("/dashboard/").content.decode()
    assert 'id="upgrade-link"' not in dashboard
    assert '<a id="plans-link" href="/pricing/">Plans and prices</a>' in dashboard
    settings.STRIPE_SECRET_KEY = "sk_test_configured"
    assert 'id="upgrade-link"' in client.get("/dashboard/").content.decode()


def test_it_confirms_the_plan_to_a_user_back_from_checkout_after_the_webhook(
    client: Any, stripe_api: FakeStripe, alice: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from tests.fixtures.stripe import deliver

    sell_plan(stripe_api, "pro")
    client.force_login(alice)
    response = client.post("/billing/upgrade/", {"plan": "pro"})
    stripe_api.pay(response["Location"].rsplit("/", 1)[1])
    with django_capture_on_commit_callbacks(execute=True):
        assert set(deliver(client, stripe_api.take())) == {200}
    back = client.get("/dashboard/?checkout=success").content.decode()
    assert "You're on Pro." in back and 'id="billing-pending"' not in back
    assert 'id="billing-confirmed"' not in client.get("/dashboard/").content.decode()


def test_it_does_not_say_nothing_was_charged_when_manage_billing_fails(
    client: Any, stripe_api: FakeStripe, alice: Any
) -> None:
    Account.objects.filter(user=alice).update(stripe_customer_id="cus_unknown")
    client.force_login(alice)
    page = client.post("/billing/manage/", follow=True).content.decode()
    assert "Stripe could not be reached just now; please try again in a moment." in page
    assert "Nothing was charged" not in page


def test_it_words_the_plans_memory_and_cpu_alike_on_the_dashboard_and_pricing_page(
    client: Any, alice: Any
) -> None:
    Plan.objects.filter(slug="free").update(memory_mb=1536, cpu_millis=500)
    client.force_login(alice)
    dashboard = client.get("/dashboard/").content.decode()
    assert '<dd id="plan-memory">1.5 GB</dd>' in dashboard
    assert '<dd id="plan-cpu">0.5 core</dd>' in dashboard
    assert "MB</dd>" not in dashboard and "core(s)" not in dashboard
    free = client.get("/pricing/").content.decode().split('id="plan-free"')[1]
    assert "<dd>1.5 GB</dd>" in free and "<dd>0.5 core</dd>" in free
