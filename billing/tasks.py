"""Billing's beat tasks, each idempotent.

- :func:`end_expired_grace`: accounts whose grace period after a failed payment has run out
  drop to the default plan; each is claimed with a conditional UPDATE
  (:func:`billing.subscriptions.end_grace`), so overlapping or repeated runs drop it once.
- :func:`reconcile_subscriptions`: accounts whose scheduled cancellation is past, or that are
  past_due without a grace period, have their subscription read again from Stripe and applied
  (:func:`billing.subscriptions.reconcile_account`, under the account's row lock): the repair
  for a webhook that never came. Stripe being unreachable skips an account until the next run.
"""

from __future__ import annotations

import logging

from celery import shared_task

from billing import stripe_client
from billing.subscriptions import (
    accounts_out_of_grace,
    accounts_to_reconcile,
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
    return done
