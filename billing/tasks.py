"""Billing's beat tasks, each idempotent.

- :func:`end_expired_grace`: accounts whose grace period after a failed payment has run out
  drop to the default plan; each is claimed with a conditional UPDATE
  (:func:`billing.subscriptions.end_grace`), so overlapping or repeated runs drop it once.
- :func:`reconcile_subscriptions`: accounts whose scheduled cancellation is past, or that are
  past_due without a grace period, have their subscription read again from Stripe and applied
  (:func:`billing.subscriptions.reconcile_account`, under the account's row lock): the repair
  for a webhook that never came. It also cancels at Stripe the subscriptions of accounts being
  deleted whose cancellation has not gone through yet. Stripe being unreachable skips an
  account until the next run.
- :func:`cancel_subscriptions`: queued when an account's deletion is requested; cancels its
  subscriptions at Stripe (:func:`billing.subscriptions.cancel_for_deletion`); if Stripe cannot
  be reached the account stays marked and the reconcile run retries it.
"""

from __future__ import annotations

import logging

from celery import shared_task

from billing import stripe_client
from billing.subscriptions import (
    accounts_out_of_grace,
    accounts_to_cancel,
    accounts_to_reconcile,
    cancel_for_deletion,
    end_grace,
    reconcile_account,
)

log = logging.getLogger(__name__)


@shared_task(acks_late=True)
def end_expired_grace() -> int:
    """Return how many accounts this run moved to the default plan."""
    return sum(end_grace(account_id) for account_id in accounts_out_of_grace())


@shared_task(acks_late=True)
def reconcile_subscriptions() -> int:
    """Return how many accounts this run read back from Stripe."""
    done = 0
    for account_id in accounts_to_reconcile():
        try:
            done += reconcile_account(account_id)
        except stripe_client.BillingUnavailable as exc:
            log.warning("account %s: subscription not reconciled: %s", account_id, exc)
    for account_id in accounts_to_cancel():
        try:
            done += cancel_for_deletion(account_id)
        except stripe_client.BillingUnavailable as exc:
            log.warning("account %s: deleted, subscription not cancelled yet: %s", account_id, exc)
    return done


@shared_task(acks_late=True)
def cancel_subscriptions(account_id: int) -> bool:
    """Cancel a deleted account's subscriptions at Stripe; False if Stripe could not be
    reached (the reconcile task retries) or there was nothing left to do."""
    try:
        return cancel_for_deletion(account_id)
    except stripe_client.BillingUnavailable as exc:
        log.warning("account %s: deleted, subscription not cancelled yet: %s", account_id, exc)
        return False
