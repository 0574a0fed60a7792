"""Stripe, behind one small module: every call Hermit makes to Stripe's API goes through here.

It is also the test seam: ``STRIPE_API_BASE`` points the SDK at another server (the tests' local
fake of Stripe's API). Settings are read on each call, so a changed setting applies at once.

Contract:
- :func:`is_configured` is False without ``STRIPE_SECRET_KEY``; every other call then raises
  :class:`BillingNotConfigured` before touching the network.
- Calls return plain values (ids, URLs, dicts of Stripe's JSON), never SDK objects.
- Any failure talking to Stripe raises :class:`BillingUnavailable`, whose message is safe to log
  and show: it names the error's kind and code, never a key.
- :func:`verify_event` checks a webhook's ``Stripe-Signature`` against ``STRIPE_WEBHOOK_SECRET``
  with the SDK and returns the event as a dict, or raises :class:`BadSignature`.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import stripe
from django.conf import settings

log = logging.getLogger(__name__)


class BillingNotConfigured(Exception):
    """Stripe keys are not set: billing is not set up on this site."""


class BillingUnavailable(Exception):
    """Stripe could not be reached or refused the request."""


class BadSignature(Exception):
    """A webhook's signature is missing or wrong, or no webhook secret is set."""


def is_configured() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


# A user waits on these calls (customer, Checkout, portal): one retry, a generous timeout.
TIMEOUT_SECONDS = 20
# A subscription is read back while the account's row is locked (a webhook, a reconcile):
# short, and never retried: Stripe sends a failed webhook again, and the beat runs again.
LOCKED_READ_TIMEOUT_SECONDS = 5


@lru_cache(maxsize=8)
def _client_for(api_key: str, api_base: str, timeout: float, retries: int) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base},
        max_network_retries=retries,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


def _client(*, timeout: float = TIMEOUT_SECONDS, retries: int = 1) -> stripe.StripeClient:
    if not is_configured():
        raise BillingNotConfigured("Billing is not set up on this site.")
    return _client_for(settings.STRIPE_SECRET_KEY, settings.STRIPE_API_BASE, timeout, retries)


def _unavailable(action: str, exc: stripe.StripeError) -> BillingUnavailable:
    """Return a safe error for a failed call (the SDK's message may quote a masked key)."""
    detail = f"{type(exc).__name__} (HTTP {exc.http_status}, code {exc.code or 'none'})"
    log.warning("Stripe refused or failed %s: %s", action, detail)
    return BillingUnavailable(f"Stripe could not {action}: {detail}")


def create_customer(email: str, user_id: int) -> str:
    """Create a Stripe customer for a Hermit user; return its id (cus_...). The request is
    idempotent per user (for Stripe's 24 hours), so a retry after a lost answer, or two
    requests at once, get the same customer rather than a second one."""
    try:
        customer = _client().v1.customers.create(
            {"email": email, "metadata": {"hermit_user_id": str(user_id)}},
            {"idempotency_key": f"hermit-customer-{user_id}"},
        )
    except stripe.StripeError as exc:
        raise _unavailable("create a customer", exc) from exc
    return str(customer.id)


def create_checkout_session(
    *,
    customer_id: str,
    price_id: str,
    user_id: int,
    plan_slug: str,
    success_url: str,
    cancel_url: str,
) -> tuple[str, str]:
    """Open a Checkout Session for a subscription to one price; return its id and the URL to
    send the user to. The session names the user (client_reference_id and metadata) and the
    plan."""
    metadata = {"hermit_user_id": str(user_id), "hermit_plan": plan_slug}
    try:
        session = _client().v1.checkout.sessions.create(
            {
                "mode": "subscription",
                "customer": customer_id,
                "line_items": [{"price": price_id, "quantity": 1}],
                "client_reference_id": str(user_id),
                "metadata": metadata,
                "subscription_data": {"metadata": metadata},
                "success_url": success_url,
                "cancel_url": cancel_url,
            }
        )
    except stripe.StripeError as exc:
        raise _unavailable("open a checkout session", exc) from exc
    if not session.url:
        raise BillingUnavailable("Stripe returned a checkout session without a URL")
    return str(session.id), str(session.url)


def expire_checkout_session(session_id: str) -> bool:
    """Expire an open Checkout Session, so it can no longer be paid; return False if it was
    not open any more (paid, or expired already): Stripe refuses those."""
    try:
        _client().v1.checkout.sessions.expire(session_id)
    except stripe.InvalidRequestError as exc:
        if exc.http_status in (400, 404):
            return False
        raise _unavailable("expire a checkout session", exc) from exc
    except stripe.StripeError as exc:
        raise _unavailable("expire a checkout session", exc) from exc
    return True


def cancel_subscription(subscription_id: str) -> dict[str, Any]:
    """Cancel a subscription at once (no proration credit, no final invoice); return it as
    JSON. A refund of what was paid is staff's to issue in Stripe. One try, briefly: it may be
    made under the account's row lock."""
    try:
        client = _client(timeout=LOCKED_READ_TIMEOUT_SECONDS, retries=0)
        subscription = client.v1.subscriptions.cancel(
            subscription_id, {"invoice_now": False, "prorate": False}
        )
    except stripe.StripeError as exc:
        raise _unavailable("cancel a subscription", exc) from exc
    return subscription.to_dict()


def create_portal_session(*, customer_id: str, return_url: str) -> str:
    """Open a customer portal session (change the card, cancel); return its URL."""
    try:
        session = _client().v1.billing_portal.sessions.create(
            {"customer": customer_id, "return_url": return_url}
        )
    except stripe.StripeError as exc:
        raise _unavailable("open the billing portal", exc) from exc
    return str(session.url)


def get_subscription(subscription_id: str) -> dict[str, Any]:
    """Return Stripe's current view of a subscription (as JSON), whatever the events said.
    Made under a row lock: one try of at most LOCKED_READ_TIMEOUT_SECONDS."""
    try:
        client = _client(timeout=LOCKED_READ_TIMEOUT_SECONDS, retries=0)
        subscription = client.v1.subscriptions.retrieve(subscription_id)
    except stripe.StripeError as exc:
        raise _unavailable("read a subscription", exc) from exc
    return subscription.to_dict()


def list_subscriptions(customer_id: str) -> list[dict[str, Any]]:
    """Return every subscription of the customer at Stripe, whatever its status (canceled
    ones included), as JSON, following Stripe's pages."""
    try:
        page = _client().v1.subscriptions.list({"customer": customer_id, "status": "all"})
        return [subscription.to_dict() for subscription in page.auto_paging_iter()]
    except stripe.StripeError as exc:
        raise _unavailable("list subscriptions", exc) from exc


def verify_event(payload: bytes, signature: str | None) -> dict[str, Any]:
    """Return the webhook's event as a dict once its signature checks out; else BadSignature."""
    secret = settings.STRIPE_WEBHOOK_SECRET
    if not secret:
        raise BadSignature("No webhook secret is set (STRIPE_WEBHOOK_SECRET).")
    if not signature:
        raise BadSignature("No Stripe-Signature header.")
    try:
        event = stripe.Webhook.construct_event(payload.decode("utf-8"), signature, secret)
    except (stripe.SignatureVerificationError, ValueError, UnicodeDecodeError) as exc:
        raise BadSignature("The Stripe-Signature header does not match the payload.") from exc
    return event.to_dict()
