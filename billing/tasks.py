"""Billing's beat task: accounts whose grace period after a failed payment has run out drop to
the default plan. Idempotent: each account is claimed with a conditional UPDATE
(:func:`billing.subscriptions.end_grace`), so overlapping or repeated runs drop it once."""

from __future__ import annotations

from celery import shared_task

from billing.subscriptions import accounts_out_of_grace, end_grace


@shared_task(acks_late=True)
def end_expired_grace() -> int:
    """Return how many accounts this run moved to the default plan."""
    return sum(end_grace(account_id) for account_id in accounts_out_of_grace())
