"""Billing's notices for pages other apps own: ``{% subscription_deletion_notice %}`` says,
on the account deletion page, that a paid subscription is cancelled along with the account
(``templates/billing/_deletion_notice.html`` includes it for them); and
``{% subscribers_deletion_notice users %}`` says the same to staff about the users they are
about to delete (``templates/billing/_staff_deletion_notice.html``, given ``users``)."""

from __future__ import annotations

from typing import Any

from django import template

from billing.models import Account
from billing.subscriptions import LIVE, current_account, has_live_subscription

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


@register.simple_tag
def subscribers_deletion_notice(users: list[Any]) -> str:
    """The sentence for staff when some of ``users`` pay for a subscription; "" otherwise."""
    paying = list(
        Account.objects.filter(user__in=users, subscription_status__in=LIVE)
        .exclude(stripe_subscription_id="")
        .select_related("user")
        .order_by("user__email")
    )
    if not paying:
        return ""
    who = ", ".join(account.user.email or account.user.username for account in paying)
    return (
        f"Their Stripe subscriptions are cancelled at once ({who}): they are not charged again. "
        "Nothing is refunded automatically: issue any refund in Stripe."
    )
