"""Stripe's webhooks: signed, applied once, and the plan follows Stripe's subscription.

The real stripe SDK talks to the local fake Stripe API (tests/fakes/stripe_api.py); the fake
signs its webhooks with the test secret as Stripe does, and the tests post them to the portal
through Django's test client. Agents run on the in-memory fake sandbox backend.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import time_machine
from django.core import mail
from django.utils import timezone

from billing import stripe_client
from billing.models import Account, Plan, PlanChange, StripeEvent
from billing.tasks import end_expired_grace
from sandboxes import actions, sleep, tasks
from sandboxes.backends.fake import FakeBackend
from sandboxes.models import Checkpoint, Sandbox
from tests.factories import make_user
from tests.fakes.stripe_api import Delivery, FakeStripe
from tests.fixtures.stripe import WEBHOOK_PATH, deliver, sell_plan

pytestmark = pytest.mark.django_db
State = Sandbox.State


@pytest.fixture
def fake(fake_backend: FakeBackend) -> Iterator[FakeBackend]:
    """The in-memory sandbox backend, with plan changes' tasks run inline."""
    from portal.celery import app

    eager = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield fake_backend
    app.conf.task_always_eager = eager


def dozing_agent(email: str) -> Sandbox:
    """A free user whose agent runs on the fake backend and now dozes."""
    user = make_user(email)
    sandbox = Sandbox.objects.get(owner=user)
    Sandbox.objects.filter(pk=sandbox.pk).update(backend="fake")
    sandbox.refresh_from_db()
    actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    assert sleep.doze(sandbox)
    sandbox.refresh_from_db()
    assert sandbox.state == State.DOZING
    return sandbox


def checkout(client: Any, stripe_api: FakeStripe, user: Any) -> str:
    """Sign in as ``user``, press Upgrade, pay on the fake Checkout; return the subscription
    id. The webhooks wait in the fake's outbox."""
    client.force_login(user)
    response = client.post("/billing/upgrade/", {"plan": "pro"})
    assert response.status_code == 302
    assert response["Location"].startswith(f"{stripe_api.url}/c/pay/cs_test_")
    session_id = response["Location"].rsplit("/", 1)[1]
    return stripe_api.pay(session_id)


def post_all(client: Any, deliveries: list[Delivery], capture: Any) -> None:
    with capture(execute=True):
        assert deliver(client, deliveries) == [200] * len(deliveries)


def account_of(user: Any) -> Account:
    return Account.objects.select_related("plan").get(user=user)


@pytest.fixture
def pro_price(stripe_api: FakeStripe) -> str:
    return sell_plan(stripe_api, "pro")


def test_it_upgrades_on_checkout_completed_at_once_and_wakes_the_agent(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    fake: FakeBackend,
    django_capture_on_commit_callbacks: Any,
) -> None:
    sandbox = dozing_agent("upgrade@example.com")
    user = sandbox.owner
    subscription_id = checkout(client, stripe_api, user)
    assert account_of(user).plan.slug == "free"  # nothing changes before Stripe confirms

    [completed] = stripe_api.take("checkout.session.completed")
    post_all(client, [completed], django_capture_on_commit_callbacks)

    account = account_of(user)
    assert account.plan.slug == "pro"
    assert account.stripe_subscription_id == subscription_id
    assert account.subscription_status == "active"
    assert account.current_period_end is not None
    assert account.current_period_end > timezone.now() + timedelta(days=29)
    change = PlanChange.objects.get(account=account)
    assert (change.from_plan.slug, change.to_plan.slug, change.source) == ("free", "pro", "stripe")
    assert change.stripe_event_id == completed.event["id"]
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and not fake.is_frozen(sandbox.slug)
    assert [m.subject for m in mail.outbox] == ["[Hermit] Welcome to Pro"]
    assert "always on" in mail.outbox[0].body

    # The rest of the payment's events, which may come in any order, change nothing more.
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    assert PlanChange.objects.count() == 1 and len(mail.outbox) == 1


def limits_of(sandbox: Sandbox) -> tuple[int, int, int, bool, bool]:
    """The plan limits the sandbox's running gateway was started with (its backend state)."""
    sandbox.refresh_from_db()
    return tuple(sandbox.backend_state["limits"])  # type: ignore[return-value]


def test_it_restarts_a_running_agent_with_the_new_plans_limits_on_upgrade_and_on_the_drop(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    fake: FakeBackend,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """A thaw keeps the cgroup and network a gateway was started with: a plan change that
    changes them restarts the agent, so a new pro user gets internet and pro's memory at once,
    and a user dropped to free loses them at once."""
    settings.HERMIT_BILLING_GRACE_DAYS = 7
    free, pro = Plan.objects.get(slug="free"), Plan.objects.get(slug="pro")
    assert free.limits() != pro.limits()
    sandbox = dozing_agent("limits@example.com")
    user = sandbox.owner
    assert limits_of(sandbox) == free.limits()
    first_instance = sandbox.backend_state["instance"]

    subscription_id = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    assert account_of(user).plan == pro
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and not fake.is_frozen(sandbox.slug)
    assert sandbox.backend_state["instance"] != first_instance  # a new gateway, not a thaw
    memory_mb, _, _, internet, browser = limits_of(sandbox)
    assert (memory_mb, internet, browser) == (pro.memory_mb + pro.browser_memory_mb, True, True)
    assert ("stop", sandbox.slug) in fake.calls
    assert sandbox.events.filter(kind="plan", message="Restarting your agent with the Pro plan")
    restarted_instance = sandbox.backend_state["instance"]

    failed_at = timezone.now()
    stripe_api.fail_payment(subscription_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    dropped_at = failed_at + timedelta(days=7, minutes=1)
    with (
        time_machine.travel(dropped_at, tick=False),
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert end_expired_grace() == 1
    assert account_of(user).plan == free
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING
    assert sandbox.backend_state["instance"] != restarted_instance
    memory_mb, _, _, internet, browser = limits_of(sandbox)
    assert (memory_mb, internet, browser) == (free.memory_mb, False, False)


def test_it_leaves_an_agent_whose_limits_did_not_change_running_and_an_asleep_one_asleep(
    fake: FakeBackend, django_capture_on_commit_callbacks: Any
) -> None:
    """Only a change of limits restarts a gateway; an asleep agent on a plan that sleeps stays
    asleep, and boots cold with the new plan's limits when it next wakes: its checkpoint (the
    old plan's memory and network setup) is dropped."""
    from billing.subscriptions import change_plan

    free = Plan.objects.get(slug="free")
    same = Plan.objects.create(slug="free-plus", name="Free plus", monthly_token_quota=2_000_000)
    bigger = Plan.objects.create(slug="roomy", name="Roomy", memory_mb=4096, internet=True)
    assert same.limits() == free.limits() and bigger.limits() != free.limits()
    sandbox = dozing_agent("same@example.com")
    instance = sandbox.backend_state["instance"]
    account = account_of(sandbox.owner)
    with django_capture_on_commit_callbacks(execute=True):
        change_plan(account, same, source=PlanChange.Source.STAFF)
    sandbox.refresh_from_db()
    assert sandbox.state == State.DOZING and sandbox.backend_state["instance"] == instance

    assert actions.sleep_sandbox(sandbox) == "checkpointed"
    with django_capture_on_commit_callbacks(execute=True):
        change_plan(account, bigger, source=PlanChange.Source.STAFF)
    sandbox.refresh_from_db()
    assert sandbox.state == State.SLEEPING and not Checkpoint.objects.filter(sandbox=sandbox)
    for _ in actions.wake_sandbox(sandbox):
        pass
    assert "restored" not in sandbox.backend_state  # a cold boot
    assert limits_of(sandbox) == bigger.limits()


@pytest.mark.django_db(transaction=True)
def test_it_restarts_an_agent_whose_start_read_the_plan_before_it_changed(
    fake: FakeBackend,
) -> None:
    """The plan changes while the agent is starting with the old plan's limits: the plan's
    task follows the start to its end, then restarts it with the new limits."""
    import threading

    from django.db import connection

    from billing.subscriptions import change_plan

    sandbox = dozing_agent("midstart@example.com")  # its sign-up recreates flushed plans
    pro = Plan.objects.get(slug="pro")
    actions.stop_sandbox(sandbox, to=State.SLEEPING)
    starting = actions.start_sandbox(sandbox)
    step = next(starting)
    while not sandbox.backend_state:  # until the backend has the spec (free's) and boots
        step = next(starting)
    assert step.percent < 100 and Sandbox.objects.get(pk=sandbox.pk).state == State.STARTING

    def upgrade() -> None:
        try:
            change_plan(account_of(sandbox.owner), pro, source=PlanChange.Source.STAFF)
        finally:
            connection.close()

    thread = threading.Thread(target=upgrade)
    thread.start()  # its apply_plan (eager) follows the start this thread finishes
    deadline = time.monotonic() + 10
    while not PlanChange.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the task has seen the start under way (it would have given up before)
    assert Sandbox.objects.get(pk=sandbox.pk).state == State.STARTING
    for _ in starting:
        pass
    thread.join(30)
    assert not thread.is_alive()
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and limits_of(sandbox) == pro.limits()


def test_it_applies_the_same_event_once(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    fake: FakeBackend,
    django_capture_on_commit_callbacks: Any,
) -> None:
    sandbox = dozing_agent("twice@example.com")
    checkout(client, stripe_api, sandbox.owner)
    [completed] = stripe_api.take("checkout.session.completed")
    post_all(client, [completed], django_capture_on_commit_callbacks)
    before = Account.objects.filter(user=sandbox.owner).values().get()

    again = stripe_api.resend(completed.event["id"])  # Stripe retries: newly signed, same id
    assert again.payload == completed.payload
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.post(
            WEBHOOK_PATH,
            data=again.payload.encode(),
            content_type="application/json",
            HTTP_STRIPE_SIGNATURE=again.signature,
        )
    assert response.status_code == 200 and response.json()["outcome"] == "duplicate"
    assert callbacks == []
    assert Account.objects.filter(user=sandbox.owner).values().get() == before
    assert PlanChange.objects.count() == 1
    assert len(mail.outbox) == 1
    assert StripeEvent.objects.filter(pk=completed.event["id"]).count() == 1


def test_it_gives_a_grace_period_after_a_failed_payment_then_drops_to_free(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    fake: FakeBackend,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.HERMIT_BILLING_GRACE_DAYS = 7
    sandbox = dozing_agent("grace@example.com")
    user = sandbox.owner
    subscription_id = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    mail.outbox.clear()

    failed_at = timezone.now()
    stripe_api.fail_payment(subscription_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    account = account_of(user)
    assert account.plan.slug == "pro" and account.subscription_status == "past_due"
    assert account.grace_until is not None
    assert abs(account.grace_until - (failed_at + timedelta(days=7))) < timedelta(seconds=30)
    [failed_mail] = mail.outbox
    assert failed_mail.subject.startswith("[Hermit] Your payment failed")
    assert account.grace_until.strftime("%-d %B %Y") in failed_mail.body

    # Stripe retries the charge, and fails again: the grace period does not start over.
    stripe_api.fail_payment(subscription_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    assert account_of(user).grace_until == account.grace_until and len(mail.outbox) == 1

    with time_machine.travel(failed_at + timedelta(days=6), tick=False):
        assert end_expired_grace() == 0
        assert tasks.sleep_idle_sandboxes()["dozed"] == 0  # still pro: always on
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING

    with time_machine.travel(failed_at + timedelta(days=7, minutes=10), tick=False):
        with django_capture_on_commit_callbacks(execute=True):
            assert end_expired_grace() == 1
        assert end_expired_grace() == 0  # a second run finds nothing to do
        account = account_of(user)
        assert account.plan.slug == "free" and account.grace_until is None
        change = PlanChange.objects.filter(account=account).first()
        assert change is not None
        assert (change.from_plan.slug, change.to_plan.slug) == ("pro", "free")
        assert change.source == PlanChange.Source.GRACE
        assert [m.subject for m in mail.outbox][1:] == ["[Hermit] Your plan is now Free"]
        # Free again: the agent, idle for a week, sleeps on the free schedule.
        assert tasks.sleep_idle_sandboxes()["hibernated"] == 1
    sandbox.refresh_from_db()
    assert sandbox.state == State.SLEEPING

    # A late retry's failure, after the drop, starts no new grace and sends no mail.
    stripe_api.fail_payment(subscription_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    assert account_of(user).grace_until is None and len(mail.outbox) == 2


def test_it_starts_the_grace_period_from_stripes_state_whichever_event_brings_it(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """invoice.payment_failed never arrives; the subscription's update says past_due."""
    settings.HERMIT_BILLING_GRACE_DAYS = 5
    user = make_user("pastdue@example.com")
    subscription_id = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    mail.outbox.clear()
    stripe_api.fail_payment(subscription_id)
    stripe_api.take("invoice.payment_failed")  # lost
    failed_at = timezone.now()
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    account = account_of(user)
    assert account.subscription_status == "past_due" and account.grace_until is not None
    assert abs(account.grace_until - (failed_at + timedelta(days=5))) < timedelta(seconds=30)
    [failed_mail] = mail.outbox
    assert failed_mail.subject.startswith("[Hermit] Your payment failed")


def test_it_reads_back_subscriptions_whose_webhooks_were_lost(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """The beat task repairs what a lost webhook left: a cancellation whose period ended (the
    deletion never arrived), and past_due with no grace period running."""
    from billing.tasks import reconcile_subscriptions

    user = make_user("lost@example.com")
    subscription_id = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    stripe_api.cancel_at_period_end(subscription_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    period_end = account_of(user).current_period_end
    assert period_end is not None
    assert reconcile_subscriptions() == 0  # the period has not ended: nothing to read
    mail.outbox.clear()

    with time_machine.travel(period_end + timedelta(minutes=5), tick=False):
        stripe_api.end_period(subscription_id)
        assert [d.type for d in stripe_api.take()] == ["customer.subscription.deleted"]  # lost
        assert account_of(user).plan.slug == "pro"
        with django_capture_on_commit_callbacks(execute=True):
            assert reconcile_subscriptions() == 1
        assert reconcile_subscriptions() == 0  # a second run finds nothing to do
    account = account_of(user)
    assert account.plan.slug == "free" and account.subscription_status == "canceled"
    assert not account.cancel_at_period_end
    change = PlanChange.objects.filter(account=account).first()
    assert change is not None and (change.from_plan.slug, change.to_plan.slug) == ("pro", "free")
    assert [m.subject for m in mail.outbox] == ["[Hermit] Your Pro plan has ended"]

    # past_due with no grace period (left by a webhook that was lost): grace starts.
    other = make_user("unpaid@example.com")
    other_subscription = checkout(client, stripe_api, other)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    stripe_api.fail_payment(other_subscription)
    stripe_api.take()  # all lost
    Account.objects.filter(user=other).update(subscription_status="past_due")
    with django_capture_on_commit_callbacks(execute=True):
        assert reconcile_subscriptions() == 1
    assert account_of(other).grace_until is not None and account_of(other).plan.slug == "pro"
    assert mail.outbox[-1].subject.startswith("[Hermit] Your payment failed")
    assert reconcile_subscriptions() == 0


def test_it_logs_a_mail_whose_template_fails_and_goes_on(caplog: Any) -> None:
    """A template error must not abort the beat's loop over accounts (end_expired_grace)."""
    from billing.mail import send_billing_mail

    class Broken:
        @property
        def name(self) -> str:
            raise RuntimeError("no name")

    user = make_user("brokenmail@example.com")
    send_billing_mail(user, "upgraded", {"plan": Broken()})
    assert mail.outbox == []
    assert "could not send the upgraded mail" in caplog.text
    send_billing_mail(user, "upgraded", {"plan": Plan.objects.get(slug="pro")})
    assert [m.subject for m in mail.outbox] == ["[Hermit] Welcome to Pro"]


def test_it_names_the_default_plan_where_a_dropped_account_goes(
    client: Any, stripe_api: FakeStripe, pro_price: str, django_capture_on_commit_callbacks: Any
) -> None:
    Plan.objects.filter(slug="free").update(name="Basic")
    user = make_user("basic@example.com")
    subscription_id = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    mail.outbox.clear()
    stripe_api.fail_payment(subscription_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    [failed_mail] = mail.outbox
    assert "your plan moves to Basic" in failed_mail.body and "Free" not in failed_mail.body
    grace = client.get("/dashboard/").content.decode()
    assert "or your plan moves to Basic then" in grace

    stripe_api.pay_invoice(stripe_api.fail_payment(subscription_id))
    stripe_api.cancel_at_period_end(subscription_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    assert "then your plan moves to Basic" in mail.outbox[-1].body
    dashboard = client.get("/dashboard/").content.decode()
    assert "then your plan moves to Basic." in dashboard and "moves to Free" not in dashboard


def test_it_ends_the_grace_period_when_the_payment_goes_through(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    user = make_user("recovers@example.com")
    subscription_id = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    invoice_id = stripe_api.fail_payment(subscription_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    assert account_of(user).grace_until is not None
    response = client.get("/dashboard/")
    assert b'id="billing-grace"' in response.content

    stripe_api.pay_invoice(invoice_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    account = account_of(user)
    assert account.grace_until is None and account.subscription_status == "active"
    with time_machine.travel(timezone.now() + timedelta(days=30), tick=False):
        assert end_expired_grace() == 0
    assert account_of(user).plan.slug == "pro"


def test_it_refuses_a_bad_signature_and_changes_nothing(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    user = make_user("forged@example.com")
    checkout(client, stripe_api, user)
    [completed] = stripe_api.take("checkout.session.completed")
    forged = json.loads(completed.payload)
    forged["id"] = "evt_forged"
    tampered = json.dumps(forged, indent=2)
    other_secret = "whsec_" + "0" * 32
    import stripe

    signed_elsewhere = stripe.WebhookSignature.generate_signature_header(
        completed.payload, other_secret
    )
    for payload, signature in [
        (tampered, completed.signature),  # the body changed after signing
        (completed.payload, signed_elsewhere),  # signed with another secret
        (completed.payload, "t=1,v1=" + "0" * 64),  # garbage
    ]:
        response = client.post(
            WEBHOOK_PATH,
            data=payload.encode(),
            content_type="application/json",
            HTTP_STRIPE_SIGNATURE=signature,
        )
        assert response.status_code == 400
    response = client.post(WEBHOOK_PATH, data=completed.payload, content_type="application/json")
    assert response.status_code == 400  # no signature at all
    assert client.get(WEBHOOK_PATH).status_code == 405

    account = account_of(user)
    assert account.plan.slug == "free" and account.stripe_subscription_id == ""
    assert not StripeEvent.objects.exists() and not PlanChange.objects.exists()
    assert mail.outbox == []

    post_all(client, [completed], django_capture_on_commit_callbacks)  # the genuine one
    assert account_of(user).plan.slug == "pro"


def test_it_refuses_a_webhook_signed_longer_ago_than_the_sdks_tolerance(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """A replayed delivery: genuine, but signed more than 300 s ago."""
    import stripe

    user = make_user("replayed@example.com")
    checkout(client, stripe_api, user)
    [completed] = stripe_api.take("checkout.session.completed")
    assert stripe.Webhook.DEFAULT_TOLERANCE == 300
    with time_machine.travel(timezone.now() + timedelta(seconds=301), tick=False):
        assert deliver(client, [completed]) == [400]
    assert account_of(user).plan.slug == "free" and not StripeEvent.objects.exists()
    with time_machine.travel(timezone.now() + timedelta(seconds=290), tick=False):
        assert deliver(client, [completed]) == [200]  # within the tolerance
    assert account_of(user).plan.slug == "pro"


def test_it_refuses_every_webhook_without_a_webhook_secret(
    client: Any, stripe_api: FakeStripe, pro_price: str, settings: Any
) -> None:
    user = make_user("nosecret@example.com")
    checkout(client, stripe_api, user)
    settings.STRIPE_WEBHOOK_SECRET = ""
    assert deliver(client, stripe_api.take()) == [400, 400, 400, 400]
    assert account_of(user).plan.slug == "free" and not StripeEvent.objects.exists()


def test_it_keeps_pro_after_a_cancel_in_the_portal_until_the_period_ends_then_free(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    fake: FakeBackend,
    django_capture_on_commit_callbacks: Any,
) -> None:
    sandbox = dozing_agent("cancel@example.com")
    user = sandbox.owner
    subscription_id = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    mail.outbox.clear()
    period_end = account_of(user).current_period_end
    assert period_end is not None

    # Manage billing → the portal → "Cancel plan", through the fake's real pages.
    response = client.post("/billing/manage/")
    assert response.status_code == 302
    portal_url = response["Location"]
    assert portal_url.startswith(f"{stripe_api.url}/p/session/")
    page = httpx.get(portal_url)
    assert "Cancel plan" in page.text
    cancelled = httpx.post(f"{portal_url}/cancel", data={"subscription": subscription_id})
    assert cancelled.status_code == 303
    assert cancelled.headers["location"] == "http://testserver/dashboard/"
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)

    account = account_of(user)
    assert account.plan.slug == "pro" and account.cancel_at_period_end
    assert account.current_period_end == period_end
    [scheduled] = mail.outbox
    assert scheduled.subject == f"[Hermit] Your Pro plan ends on {period_end:%-d %B %Y}"
    dashboard = client.get("/dashboard/").content.decode()
    assert f"Pro ends on {period_end:%-d %B %Y}" in dashboard

    with time_machine.travel(period_end + timedelta(seconds=5), tick=False):
        stripe_api.end_period(subscription_id)
        [deleted] = stripe_api.take()
        assert deleted.type == "customer.subscription.deleted"
        post_all(client, [deleted], django_capture_on_commit_callbacks)
        account = account_of(user)
        assert account.plan.slug == "free" and account.subscription_status == "canceled"
        assert not account.cancel_at_period_end
        change = PlanChange.objects.filter(account=account).first()
        assert change is not None and change.stripe_event_id == deleted.event["id"]
        assert mail.outbox[-1].subject == "[Hermit] Your Pro plan has ended"
        assert tasks.sleep_idle_sandboxes()["hibernated"] == 1  # free: it sleeps when idle
    sandbox.refresh_from_db()
    assert sandbox.state == State.SLEEPING


def test_it_is_not_fooled_by_events_out_of_order(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    user = make_user("shuffled@example.com")
    subscription_id = checkout(client, stripe_api, user)
    paid = stripe_api.take()
    stripe_api.cancel_at_period_end(subscription_id)
    stripe_api.end_period(subscription_id)
    later = stripe_api.take()
    # The deletion arrives first, then the cancellation, then the payment's own events.
    post_all(client, list(reversed(later)) + paid, django_capture_on_commit_callbacks)
    account = account_of(user)
    assert account.plan.slug == "free" and account.subscription_status == "canceled"
    assert not account.cancel_at_period_end
    assert not PlanChange.objects.exists()  # never wrongly upgraded on the way

    # A new subscription later is not undone by news of the old one.
    subscription_2 = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    stale = stripe_api.resend(later[-1].event["id"])
    stripe_api.take()
    post_all(client, [stale], django_capture_on_commit_callbacks)  # already applied: no-op
    stripe_api.events.append({**later[-1].event, "id": "evt_stale_copy"})
    post_all(client, [stripe_api.resend("evt_stale_copy")], django_capture_on_commit_callbacks)
    stripe_api.take()
    account = account_of(user)
    assert account.plan.slug == "pro" and account.stripe_subscription_id == subscription_2


def test_it_reads_stripe_back_once_and_briefly_while_it_holds_the_account_lock(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    monkeypatch: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """The read happens under the account's row lock: one try, a short timeout, and a 503 so
    Stripe sends the event again later."""
    from billing import stripe_client

    user = make_user("briefly@example.com")
    subscription_id = checkout(client, stripe_api, user)
    [completed] = stripe_api.take("checkout.session.completed")
    path = f"/v1/subscriptions/{subscription_id}"

    def reads() -> list[Any]:
        return [r for r in stripe_api.requests if r[1] == path]

    stripe_api.failing[path] = 1
    assert deliver(client, [completed]) == [503]
    assert len(reads()) == 1  # not retried
    assert account_of(user).plan.slug == "free" and not StripeEvent.objects.exists()

    assert stripe_client.LOCKED_READ_TIMEOUT_SECONDS <= 5
    monkeypatch.setattr(stripe_client, "LOCKED_READ_TIMEOUT_SECONDS", 0.2)
    stripe_api.slow[path] = 0.8
    started = time.monotonic()
    assert deliver(client, [completed]) == [503]
    assert time.monotonic() - started < 0.7 and len(reads()) == 2

    stripe_api.slow.clear()
    post_all(client, [stripe_api.resend(completed.event["id"])], django_capture_on_commit_callbacks)
    assert account_of(user).plan.slug == "pro"


def test_it_acknowledges_event_types_it_does_not_act_on(
    client: Any, stripe_api: FakeStripe
) -> None:
    user = make_user("other@example.com")
    event = {
        "id": "evt_customer_updated",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": int(timezone.now().timestamp()),
        "data": {"object": {"id": "cus_x", "object": "customer"}},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "customer.updated",
    }
    stripe_api.events.append(event)
    delivery = stripe_api.resend(event["id"])
    response = client.post(
        WEBHOOK_PATH,
        data=delivery.payload.encode(),
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=delivery.signature,
    )
    assert response.status_code == 200 and response.json()["outcome"] == "ignored"
    assert account_of(user).plan.slug == "free"


def test_it_follows_a_plan_change_made_in_the_portal_and_keeps_unknown_prices_out(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """A subscription moved to another price follows that price's plan; a price no plan has
    leaves the plan as it is."""
    team = Plan.objects.create(
        slug="team", name="Team", sleeps=False, public=True, price_monthly=30
    )
    user = make_user("switch@example.com")
    subscription_id = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    team_price = sell_plan(stripe_api, "team")
    with stripe_api._lock:
        item = stripe_api.subscriptions[subscription_id]["items"]["data"][0]
        item["price"] = stripe_api.prices[team_price]
        delivery = stripe_api._event(
            "customer.subscription.updated", stripe_api.subscriptions[subscription_id]
        )
    post_all(client, [delivery], django_capture_on_commit_callbacks)
    assert account_of(user).plan == team
    welcomes = ["[Hermit] Welcome to Pro", "[Hermit] Welcome to Team"]
    assert [m.subject for m in mail.outbox] == welcomes

    # Back to the cheaper pro: followed, but no "welcome" (it is no upgrade).
    with stripe_api._lock:
        item["price"] = stripe_api.prices[pro_price]
        delivery = stripe_api._event(
            "customer.subscription.updated", stripe_api.subscriptions[subscription_id]
        )
    post_all(client, [delivery], django_capture_on_commit_callbacks)
    assert account_of(user).plan.slug == "pro" and len(mail.outbox) == 2
    with stripe_api._lock:
        item["price"] = stripe_api.prices[team_price]
        delivery = stripe_api._event(
            "customer.subscription.updated", stripe_api.subscriptions[subscription_id]
        )
    post_all(client, [delivery], django_capture_on_commit_callbacks)
    assert account_of(user).plan == team

    unknown = stripe_api.create_price(999, "Unlisted")
    with stripe_api._lock:
        item["price"] = stripe_api.prices[unknown]
        delivery = stripe_api._event(
            "customer.subscription.updated", stripe_api.subscriptions[subscription_id]
        )
    post_all(client, [delivery], django_capture_on_commit_callbacks)
    assert account_of(user).plan == team


@pytest.mark.django_db(transaction=True)
def test_it_applies_an_event_delivered_several_times_at_once_once(
    stripe_api: FakeStripe, settings: Any
) -> None:
    import threading

    from django.db import connection
    from django.test import Client

    sell_plan(stripe_api, "pro")
    user = make_user("concurrent@example.com")
    client = Client()
    checkout(client, stripe_api, user)
    [completed] = stripe_api.take("checkout.session.completed")
    statuses: list[int] = []
    start = threading.Barrier(4)

    def post() -> None:
        try:
            start.wait()
            statuses.extend(deliver(Client(), [completed]))
        finally:
            connection.close()

    threads = [threading.Thread(target=post) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [200] * 4
    assert account_of(user).plan.slug == "pro"
    assert PlanChange.objects.count() == 1 and StripeEvent.objects.count() == 1
    assert [m.subject for m in mail.outbox] == ["[Hermit] Welcome to Pro"]


def test_it_runs_the_reconcile_task_on_the_beat_schedule(settings: Any) -> None:
    from billing.tasks import reconcile_subscriptions

    entry = settings.CELERY_BEAT_SCHEDULE["reconcile-subscriptions"]
    assert entry["task"] == reconcile_subscriptions.name


def test_it_runs_the_grace_task_on_the_beat_schedule(settings: Any) -> None:
    from portal.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["end-billing-grace"]
    assert entry["task"] == end_expired_grace.name
    Account.objects.filter(user=make_user("due@example.com")).update(
        plan=Plan.objects.get(slug="pro"), grace_until=timezone.now() - timedelta(minutes=1)
    )
    assert app.tasks[entry["task"]].apply().get() == 1


def test_it_cancels_a_second_subscription_paid_from_another_tab_and_mails_the_user(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    fake: FakeBackend,
    django_capture_on_commit_callbacks: Any,
    caplog: Any,
) -> None:
    """Two tabs open Checkout; Stripe cannot expire the first when the second opens (the
    Stripe call fails), so both get paid: the webhook cancels the second at once."""
    user = dozing_agent("twotabs@example.com").owner
    client.force_login(user)
    first = client.post("/billing/upgrade/", {"plan": "pro"})["Location"].rsplit("/", 1)[1]
    stripe_api.failing[f"/v1/checkout/sessions/{first}/expire"] = 2  # the SDK retries once
    second = client.post("/billing/upgrade/", {"plan": "pro"})["Location"].rsplit("/", 1)[1]
    assert stripe_api.sessions[first]["status"] == "open"  # not expired: both can be paid
    kept = stripe_api.pay(first)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    mail.outbox.clear()

    with caplog.at_level("WARNING", logger="billing.subscriptions"):
        extra = stripe_api.pay(second)
        post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)

    assert stripe_api.subscriptions[extra]["status"] == "canceled"
    assert stripe_api.subscriptions[kept]["status"] == "active"
    [cancel] = [p for m, path, p in stripe_api.requests if m == "DELETE"]
    assert cancel == {"invoice_now": "false", "prorate": "false"}
    account = account_of(user)
    assert (account.plan.slug, account.stripe_subscription_id) == ("pro", kept)
    assert account.subscription_status == "active"
    assert PlanChange.objects.filter(account=account).count() == 1
    [record] = [r for r in caplog.records if extra in r.getMessage()]
    assert record.levelname == "WARNING" and kept in record.getMessage()
    assert stripe_api.api_key not in caplog.text
    assert [m.subject for m in mail.outbox] == [
        "[Hermit] Your second Pro subscription was cancelled"
    ]
    assert "refund" in mail.outbox[0].body

    # Its deletion event, and any replay, change nothing more.
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    assert len(mail.outbox) == 1 and account_of(user).stripe_subscription_id == kept


def test_it_takes_a_new_subscription_when_the_tracked_one_has_ended_at_stripe(
    client: Any,
    stripe_api: FakeStripe,
    pro_price: str,
    fake: FakeBackend,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """The old subscription's end never reached Hermit: a new one is no duplicate."""
    user = dozing_agent("renewed@example.com").owner
    old = checkout(client, stripe_api, user)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    stripe_api.subscriptions[old]["status"] = "canceled"  # its webhook was lost
    account = account_of(user)
    assert account.subscription_status == "active"  # what Hermit still believes
    session_id, _ = stripe_client.create_checkout_session(
        customer_id=account.stripe_customer_id,
        price_id=pro_price,
        user_id=user.pk,
        plan_slug="pro",
        success_url="http://testserver/dashboard/",
        cancel_url="http://testserver/pricing/",
    )
    new = stripe_api.pay(session_id)
    post_all(client, stripe_api.take(), django_capture_on_commit_callbacks)
    assert stripe_api.subscriptions[new]["status"] == "active"
    assert account_of(user).stripe_subscription_id == new
    assert not [p for m, path, p in stripe_api.requests if m == "DELETE"]
