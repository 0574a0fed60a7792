"""Billing's notices for pages other apps own: ``{% subscription_deletion_notice %}`` says,
on the account deletion page, that a paid subscription is cancelled along with the account
(``templates/billing/_deletion_notice.html`` includes it for them)."""

from __future__ import annotations

from typing import Any

from django import template

from billing.subscriptions import current_account, has_live_subscription

register = template.Library()


@register.simple_tag(takes_context=True)
def subscription_deletion_notice(context: dict[str, Any]) -> str:
    """The sentence for a signed-in user with a live subscription; "" for anyone else."""
    user = context.get("user")
    if user is None or not user.is_authenticated:
        return ""
    account = current_account(user)
    if account is None or not has_live_subscription(account):
        return ""
    return (
        f"Your {account.plan.name} subscription is cancelled at once, at Stripe: you are not "
        "charged again. It is not refunded automatically: ask support for a refund."
    )
