"""Moving accounts between plans: the one plan-changing action, Stripe's events, and the grace
period after a failed payment.

Contract:
- :func:`change_plan` is the only writer of ``Account.plan``. It records a :class:`PlanChange`
  (from, to, source, actor, reason, Stripe event id) and saves the account, whose post_save
  signal (``sandboxes.signals``) queues ``apply_plan``: the new plan takes effect at once.
- A paid plan starts only when Stripe confirms it: :func:`start_checkout` opens a Checkout
  Session and changes nothing here; :func:`handle_event` applies Stripe's webhook events.
- :func:`handle_event` applies each event id at most once: the :class:`StripeEvent` row is
  written in the same transaction as the event's effect. It treats an event as news that a
  subscription changed and reads the subscription's current state from Stripe under the
  account's row lock, so events that arrive late, twice or out of order cannot roll an account
  back. News of an older subscription than the account's own is ignored unless that one is live.
- Two Checkouts (two tabs): opening one expires the account's previous open session at
  Stripe, so only the newest can be paid; and a second live subscription the webhook brings
  while the account's own is still live at Stripe is cancelled there at once (no proration, no
  final invoice: a refund is staff's to issue in Stripe), logged at warning and mailed.
- A deletion of the account (``sandboxes.accounts.deletion_requested``) marks it, and
  :func:`cancel_for_deletion` cancels its live subscriptions at Stripe at once, recorded as a
  PlanChange to the default plan; until Stripe confirms, the reconcile task retries. Should
  the account's row be purged first, :func:`cancel_before_purge` tries once more, and logs at
  error level for staff if Stripe still cannot be reached.
- A subscription Stripe reports ``past_due`` on a paid plan starts a grace period
  (``HERMIT_BILLING_GRACE_DAYS``) if none runs, whichever event brought the news; an active
  subscription ends it. :func:`end_grace` drops an account whose grace has run out to the
  default plan (claimed with a conditional UPDATE, so running it twice is safe).
- Webhooks get lost: :func:`reconcile_account` re-reads from Stripe the subscription of an
  account whose scheduled cancellation is past, or that is past_due with no grace running,
  and applies it as an event would (a no-op when nothing changed), so a lost
  ``customer.subscription.deleted`` cannot keep a paid plan forever.
- Users are mailed (after commit) when a payment fails, when the plan is dropped or ends, when
  they move to a plan that costs more, and when a cancellation is scheduled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from billing import stripe_client
from billing.mail import send_billing_mail
from billing.models import Account, Plan, PlanChange, StripeEvent, default_plan

log = logging.getLogger(__name__)

# Subscription statuses under which the paid plan is kept (past_due: within the grace period).
LIVE = frozenset({"active", "trialing", "past_due"})
# Statuses under which a customer must not be sent to Checkout again: a subscription that is
# live, or whose first payment is still being made (incomplete).
BLOCKS_CHECKOUT = LIVE | {"incomplete"}
PAID_UP = frozenset({"active", "trialing"})
ENDED = frozenset({"canceled", "unpaid", "incomplete_expired", "paused"})

HANDLED = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.payment_failed",
        "invoice.paid",
        "invoice.payment_succeeded",
    }
)


class PlanNotForSale(Exception):
    """The plan has no Stripe price, or is not public."""


class AlreadySubscribed(Exception):
    """The account has a live subscription: changes go through the billing portal."""


ALREADY_SUBSCRIBED = (
    "You already have a subscription, or a payment for one is going through: "
    "change it with Manage billing."
)


class NoBillingAccount(Exception):
    """The user has never paid through Stripe: there is no billing portal to open."""


def change_plan(
    account: Account,
    plan: Plan,
    *,
    source: str,
    actor: Any = None,
    reason: str = "",
    stripe_event_id: str = "",
) -> PlanChange | None:
    """Move ``account`` to ``plan`` and record it; return the PlanChange, or None if the account
    was already on that plan. The account row is locked for the change, so two changes at once
    are applied one after the other, each from the plan the other left."""
    with transaction.atomic():
        current = Account.objects.select_for_update().select_related("plan").get(pk=account.pk)
        if current.plan_id == plan.pk:
            account.plan = plan
            return None
        from_plan = current.plan
        current.plan = plan
        current.save(update_fields=["plan"])  # the post_save signal queues apply_plan
        account.plan = plan
        return PlanChange.objects.create(
            account=current,
            from_plan=from_plan,
            to_plan=plan,
            source=source,
            actor=actor,
            reason=reason[:255],
            stripe_event_id=stripe_event_id,
        )


def account_for(user: Any) -> Account:
    """Return the user's account, creating it on the default plan if missing."""
    account, _ = Account.objects.select_related("plan").get_or_create(
        user=user, defaults={"plan": default_plan()}
    )
    return account


def current_account(user: Any) -> Account | None:
    """Return the user's account if it exists, creating nothing (for pages read with GET)."""
    return Account.objects.select_related("plan").filter(user=user).first()


def for_sale(plan: Plan) -> bool:
    return plan.public and bool(plan.stripe_price_id) and plan.is_paid


def has_live_subscription(account: Account) -> bool:
    return bool(account.stripe_subscription_id) and account.subscription_status in LIVE


def start_checkout(user: Any, plan: Plan, *, success_url: str, cancel_url: str) -> str:
    """Return the URL of a Stripe Checkout page for ``user`` to subscribe to ``plan``.

    Raises BillingNotConfigured (no Stripe keys), PlanNotForSale, AlreadySubscribed, or
    BillingUnavailable. The plan itself changes only when Stripe confirms the payment.

    Stripe decides whether the user already subscribes, not the local row: a payment whose
    webhooks have not arrived yet leaves the row on the free plan, and a second Checkout would
    make a second subscription. So the customer's subscriptions are listed at Stripe first."""
    if not stripe_client.is_configured():
        raise stripe_client.BillingNotConfigured("Billing is not set up on this site.")
    if not for_sale(plan):
        raise PlanNotForSale(f"{plan.name} cannot be bought here.")
    account = account_for(user)
    if has_live_subscription(account):
        raise AlreadySubscribed(ALREADY_SUBSCRIBED)
    customer_id = ensure_customer(account)
    if any(
        subscription.get("status") in BLOCKS_CHECKOUT
        for subscription in stripe_client.list_subscriptions(customer_id)
    ):
        raise AlreadySubscribed(ALREADY_SUBSCRIBED)
    session_id, url = stripe_client.create_checkout_session(
        customer_id=customer_id,
        price_id=plan.stripe_price_id,
        user_id=account.user_id,
        plan_slug=plan.slug,
        success_url=success_url,
        cancel_url=cancel_url,
    )
    _expire_older_checkout(account, session_id)
    return url


def _expire_older_checkout(account: Account, session_id: str) -> None:
    """Remember ``session_id`` as the account's open Checkout and expire the one it replaces,
    so only the newest can be paid (two tabs, two sessions). The swap is made under the row
    lock, so of two at once each expires the one it replaced. A session Stripe cannot expire
    now is logged: the webhook cancels a second subscription should it be paid."""
    with transaction.atomic():
        locked = Account.objects.select_for_update().get(pk=account.pk)
        older = locked.checkout_session_id
        locked.checkout_session_id = session_id
        locked.save(update_fields=["checkout_session_id"])
    account.checkout_session_id = session_id
    if not older or older == session_id:
        return
    try:
        stripe_client.expire_checkout_session(older)
    except stripe_client.BillingUnavailable as exc:
        log.warning("account %s: older checkout session not expired: %s", account.pk, exc)


def ensure_customer(account: Account) -> str:
    """Return the account's Stripe customer id, creating the customer once."""
    if account.stripe_customer_id:
        return account.stripe_customer_id
    customer_id = stripe_client.create_customer(account.user.email, account.user_id)
    won = Account.objects.filter(pk=account.pk, stripe_customer_id="").update(
        stripe_customer_id=customer_id
    )
    if not won:  # another request created one first: use theirs
        account.refresh_from_db(fields=["stripe_customer_id"])
        return account.stripe_customer_id
    account.stripe_customer_id = customer_id
    return customer_id


def open_portal(user: Any, *, return_url: str) -> str:
    """Return the URL of the Stripe customer portal for ``user`` (card, invoices, cancel).

    Raises BillingNotConfigured, NoBillingAccount (never paid) or BillingUnavailable."""
    if not stripe_client.is_configured():
        raise stripe_client.BillingNotConfigured("Billing is not set up on this site.")
    account = account_for(user)
    if not account.stripe_customer_id:
        raise NoBillingAccount("You have no billing account yet.")
    return stripe_client.create_portal_session(
        customer_id=account.stripe_customer_id, return_url=return_url
    )


# --- Stripe's events ------------------------------------------------------------------------


def handle_event(event: dict[str, Any]) -> str:
    """Apply one verified Stripe event at most once; return "applied", "duplicate" or
    "ignored" (a type Hermit does not act on, or an event about no account of ours).

    Raises BillingUnavailable if Stripe cannot be read: nothing is recorded, and Stripe sends
    the event again later."""
    event_id, event_type = str(event["id"]), str(event["type"])
    if StripeEvent.objects.filter(pk=event_id).exists():
        return "duplicate"
    obj: dict[str, Any] = event.get("data", {}).get("object") or {}
    with transaction.atomic():
        _, created = StripeEvent.objects.get_or_create(pk=event_id, defaults={"type": event_type})
        if not created:
            return "duplicate"
        subscription_id = _subscription_id(event_type, obj)
        if event_type not in HANDLED or not subscription_id:
            return "ignored"
        account = _locked_account(obj)
        if account is None:
            log.warning("Stripe event %s (%s) names no Hermit account", event_id, event_type)
            return "ignored"
        subscription = stripe_client.get_subscription(subscription_id)
        _sync(account, subscription, event_id=event_id, event_type=event_type)
    return "applied"


def _id(value: Any) -> str:
    """An expandable field's id: Stripe sends either the id or the expanded object."""
    if isinstance(value, dict):
        return str(value.get("id") or "")
    return str(value or "")


def _subscription_id(event_type: str, obj: dict[str, Any]) -> str:
    if event_type.startswith("customer.subscription."):
        return _id(obj.get("id"))
    if event_type == "checkout.session.completed":
        return _id(obj.get("subscription")) if obj.get("mode") == "subscription" else ""
    if event_type.startswith("invoice."):
        details = (obj.get("parent") or {}).get("subscription_details") or {}
        return _id(details.get("subscription") or obj.get("subscription"))
    return ""


def _locked_account(obj: dict[str, Any]) -> Account | None:
    """Return the account the event's object belongs to, locked: by Stripe customer, else (a
    customer Checkout made) by the user id Hermit put in the session or subscription."""
    accounts = Account.objects.select_for_update().select_related("plan", "user")
    customer_id = _id(obj.get("customer"))
    if customer_id:
        account = accounts.filter(stripe_customer_id=customer_id).first()
        if account is not None:
            return account
    user_id = obj.get("client_reference_id") or (obj.get("metadata") or {}).get("hermit_user_id")
    if not customer_id or not str(user_id or "").isdigit():
        return None
    account = accounts.filter(user_id=int(str(user_id)), stripe_customer_id="").first()
    if account is not None:
        account.stripe_customer_id = customer_id
        account.save(update_fields=["stripe_customer_id"])
    return account


def _price_id(subscription: dict[str, Any]) -> str:
    items = (subscription.get("items") or {}).get("data") or []
    return _id((items[0].get("price") or {}).get("id")) if items else ""


def _period_end(subscription: dict[str, Any]) -> datetime | None:
    """The end of the paid period: on the subscription's item (API 2025-03 and later), or on
    the subscription itself (earlier API versions)."""
    items = (subscription.get("items") or {}).get("data") or []
    stamp = (items[0].get("current_period_end") if items else None) or subscription.get(
        "current_period_end"
    )
    return datetime.fromtimestamp(int(stamp), tz=UTC) if stamp else None


@dataclass
class _Mails:
    """What to mail the user once the transaction commits."""

    kinds: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def add(self, kind: str, **context: Any) -> None:
        self.kinds.append((kind, context))

    def send_on_commit(self, user: Any) -> None:
        for kind, context in self.kinds:
            transaction.on_commit(partial(send_billing_mail, user, kind, context))


def _sync(
    account: Account, subscription: dict[str, Any], *, event_id: str, event_type: str
) -> None:
    """Bring the locked ``account`` in line with Stripe's current ``subscription``."""
    status = str(subscription.get("status") or "")
    subscription_id = _id(subscription.get("id"))
    if (
        account.stripe_subscription_id
        and subscription_id != account.stripe_subscription_id
        and status not in LIVE
    ):
        return  # news of an older subscription, which no longer decides the plan
    if _is_second_live(account, subscription_id, status):
        _cancel_second(account, subscription_id, event_type=event_type)
        return
    now = timezone.now()
    mails = _Mails()
    was_cancelling = account.cancel_at_period_end
    account.stripe_subscription_id = subscription_id
    account.subscription_status = status
    account.current_period_end = _period_end(subscription)
    account.cancel_at_period_end = status in LIVE and bool(
        subscription.get("cancel_at_period_end") or subscription.get("cancel_at")
    )
    if account.cancel_at_period_end and subscription.get("cancel_at"):
        stamp = int(subscription["cancel_at"])
        account.current_period_end = datetime.fromtimestamp(stamp, tz=UTC)
    if account.cancel_at_period_end and not was_cancelling:
        mails.add("cancel_scheduled", plan=account.plan, ends_at=account.current_period_end)
    if status in PAID_UP:
        account.grace_until = None
    elif (
        status == "past_due"
        and account.grace_until is None
        and account.plan_id != default_plan().pk
    ):
        account.grace_until = now + timedelta(days=settings.HERMIT_BILLING_GRACE_DAYS)
        mails.add("payment_failed", plan=account.plan, grace_until=account.grace_until)
    account.save(
        update_fields=[
            "stripe_subscription_id",
            "subscription_status",
            "current_period_end",
            "cancel_at_period_end",
            "grace_until",
        ]
    )
    target = _target_plan(account, subscription, status)
    if target is not None:
        old = account.plan
        change = change_plan(
            account,
            target,
            source=PlanChange.Source.STRIPE,
            reason=f"Stripe: {event_type} (subscription {status})",
            stripe_event_id=event_id,
        )
        if change is not None and status in PAID_UP:
            if target.price_monthly > old.price_monthly:  # a cheaper plan is no upgrade
                mails.add("upgraded", plan=target)
        elif change is not None:
            mails.add("plan_ended", old_plan=old, plan=target)
    mails.send_on_commit(account.user)


def _is_second_live(account: Account, subscription_id: str, status: str) -> bool:
    """Whether ``subscription_id`` is a second live subscription of a customer whose account
    already has a different one that Stripe still has live (two Checkouts paid)."""
    tracked = account.stripe_subscription_id
    if not tracked or subscription_id == tracked or status not in LIVE:
        return False
    if account.subscription_status not in LIVE:
        return False
    return str(stripe_client.get_subscription(tracked).get("status") or "") in LIVE


def _cancel_second(account: Account, subscription_id: str, *, event_type: str) -> None:
    """Cancel the second subscription at Stripe at once (the account keeps its own), log it
    for staff, who refund it in Stripe, and mail the user. Raises BillingUnavailable if Stripe
    cannot cancel it: nothing is recorded, and Stripe sends the event again."""
    stripe_client.cancel_subscription(subscription_id)
    log.warning(
        "account %s: second live subscription %s cancelled at Stripe (%s); kept %s; "
        "its payment is to be refunded in Stripe",
        account.pk,
        subscription_id,
        event_type,
        account.stripe_subscription_id,
    )
    mails = _Mails()
    mails.add("duplicate_cancelled", plan=account.plan)
    mails.send_on_commit(account.user)


def _target_plan(account: Account, subscription: dict[str, Any], status: str) -> Plan | None:
    """The plan the subscription says the account is on, or None to leave it as it is."""
    if status in PAID_UP:
        price_id = _price_id(subscription)
        plan = Plan.objects.filter(stripe_price_id=price_id).first() if price_id else None
        if plan is None:
            log.warning("Stripe subscription's price %r is no plan's: plan left", price_id)
        return plan
    if status in ENDED:
        return default_plan()
    return None  # past_due (grace decides), incomplete (not paid yet)


# --- Grace after a failed payment -----------------------------------------------------------


def end_grace(account_id: int, now: datetime | None = None) -> bool:
    """Drop the account to the default plan if its grace period has run out; return True if
    this call did it (False: not due, paid meanwhile, or already done by another run)."""
    now = now or timezone.now()
    with transaction.atomic():
        claimed = Account.objects.filter(pk=account_id, grace_until__lte=now).update(
            grace_until=None
        )
        if not claimed:
            return False
        account = Account.objects.select_related("plan", "user").get(pk=account_id)
        old = account.plan
        change = change_plan(
            account,
            default_plan(),
            source=PlanChange.Source.GRACE,
            reason="Payment not received by the end of the grace period",
        )
        if change is not None:
            mails = _Mails()
            mails.add("plan_dropped", old_plan=old, plan=account.plan)
            mails.send_on_commit(account.user)
    return True


def _due_for_reconcile(now: datetime) -> Q:
    """Accounts whose local subscription state has outlived what it promised."""
    cancel_passed = Q(cancel_at_period_end=True, current_period_end__lte=now)
    unpaid_without_grace = Q(subscription_status="past_due", grace_until__isnull=True) & ~Q(
        plan__is_default=True
    )
    return ~Q(stripe_subscription_id="") & (cancel_passed | unpaid_without_grace)


def accounts_to_reconcile(now: datetime | None = None) -> list[int]:
    """Return the ids of accounts whose subscription should be read again from Stripe: a
    cancellation at period end whose period is over, or past_due with no grace period."""
    now = now or timezone.now()
    return list(Account.objects.filter(_due_for_reconcile(now)).values_list("pk", flat=True))


def reconcile_account(account_id: int, now: datetime | None = None) -> bool:
    """Read the account's subscription from Stripe and apply it, under the account's row lock;
    return True if it was read (False: no longer due, e.g. a webhook or another run did it).

    Raises BillingUnavailable if Stripe cannot be read (nothing changes)."""
    now = now or timezone.now()
    with transaction.atomic():
        account = (
            Account.objects.select_for_update(of=("self",))
            .select_related("plan", "user")
            .filter(_due_for_reconcile(now), pk=account_id)
            .first()
        )
        if account is None:
            return False
        subscription = stripe_client.get_subscription(account.stripe_subscription_id)
        _sync(account, subscription, event_id="", event_type="reconcile")
    return True


def accounts_out_of_grace(now: datetime | None = None) -> list[int]:
    """Return the ids of accounts whose grace period has run out."""
    now = now or timezone.now()
    return list(Account.objects.filter(grace_until__lte=now).values_list("pk", flat=True))


# --- Account deletion -------------------------------------------------------------------------


def request_cancel_for_deletion(user: Any) -> int | None:
    """Mark the account of a user whose deletion was requested, if it has a Stripe customer,
    as to be cancelled at Stripe; return its id (None: nothing to cancel). Made in the
    deletion's transaction, so the mark is kept even if Stripe is down right now."""
    account = current_account(user)
    if account is None or not account.stripe_customer_id:
        return None
    Account.objects.filter(pk=account.pk, cancel_requested_at__isnull=True).update(
        cancel_requested_at=timezone.now()
    )
    return account.pk


def accounts_to_cancel() -> list[int]:
    """Return the ids of accounts being deleted whose subscriptions Stripe has not cancelled
    yet."""
    return list(
        Account.objects.filter(cancel_requested_at__isnull=False).values_list("pk", flat=True)
    )


def cancel_all_at_stripe(customer_id: str) -> list[dict[str, Any]]:
    """Cancel at once every subscription of the customer that is live or being paid; return
    them as Stripe left them. Raises BillingUnavailable (some may be cancelled already)."""
    return [
        stripe_client.cancel_subscription(_id(subscription.get("id")))
        for subscription in stripe_client.list_subscriptions(customer_id)
        if subscription.get("status") in BLOCKS_CHECKOUT
    ]


def cancel_before_purge(account: Account) -> None:
    """The last chance, as a deleted account's row goes (its user is purged) while its
    cancellation is still pending: cancel at Stripe, or log at error level for staff to cancel
    the customer's subscriptions by hand. Records nothing (the rows are being deleted)."""
    if account.cancel_requested_at is None or not account.stripe_customer_id:
        return
    try:
        cancelled = cancel_all_at_stripe(account.stripe_customer_id)
    except stripe_client.BillingUnavailable as exc:
        log.error(
            "account %s purged, but Stripe customer %s's subscriptions could not be "
            "cancelled: cancel them in Stripe (%s)",
            account.pk,
            account.stripe_customer_id,
            exc,
        )
        return
    ids = ", ".join(_id(subscription.get("id")) for subscription in cancelled) or "none live"
    log.warning("account %s purged: subscriptions cancelled at Stripe: %s", account.pk, ids)


def cancel_for_deletion(account_id: int) -> bool:
    """Cancel at once, at Stripe, every subscription of a deleted account's customer that is
    live or being paid; record it (a PlanChange to the default plan) and mail the user. Return
    True if this call finished the job (False: not marked, or done already).

    Raises BillingUnavailable if Stripe cannot be reached: the mark stays, and the reconcile
    task tries again until Stripe has cancelled them."""
    account = (
        Account.objects.select_related("plan", "user")
        .filter(pk=account_id, cancel_requested_at__isnull=False)
        .first()
    )
    if account is None:
        return False
    cancelled = cancel_all_at_stripe(account.stripe_customer_id)
    with transaction.atomic():
        claimed = Account.objects.filter(pk=account_id, cancel_requested_at__isnull=False).update(
            cancel_requested_at=None
        )
        if not claimed:
            return False
        if not cancelled:
            return True
        account = (
            Account.objects.select_for_update().select_related("plan", "user").get(pk=account_id)
        )
        old = account.plan
        ids = ", ".join(_id(subscription.get("id")) for subscription in cancelled)
        if account.stripe_subscription_id in ids.split(", "):
            account.subscription_status = "canceled"
            account.cancel_at_period_end = False
            account.grace_until = None
            account.save(
                update_fields=["subscription_status", "cancel_at_period_end", "grace_until"]
            )
        change_plan(
            account,
            default_plan(),
            source=PlanChange.Source.DELETION,
            reason=f"Account deleted: subscription {ids} cancelled at Stripe",
        )
        log.info(
            "account %s: subscription %s cancelled at Stripe (account deleted)", account_id, ids
        )
        mails = _Mails()
        mails.add("subscription_cancelled", plan=old if old.is_paid else account.plan)
        mails.send_on_commit(account.user)
    return True
