"""This month's AI usage of one user, for the dashboard.

Tokens that count against the quota are the metered ones (operator-paid); calls paid with the
user's own key (BYOK) are shown separately and do not use up the quota.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db.models import Count, Q, Sum

from ai_gateway.limits import month_start, next_month_start
from ai_gateway.models import UsageRecord
from billing.models import plan_for


def month_usage(user: Any, now: datetime | None = None) -> dict[str, Any]:
    """Return this calendar month's usage for ``user``.

    Keys: ``input_tokens``, ``output_tokens``, ``tokens`` (metered, input + output), ``cost``
    (Decimal, metered calls), ``byok_tokens``, ``requests``, ``quota`` (0 = unlimited),
    ``percent`` (0-100, of the quota; 0 when unlimited), ``spend_limit`` (Decimal USD, 0 =
    unlimited), ``spend_percent`` (0-100), ``exhausted`` (bool: either limit reached),
    ``period_start`` and ``resets_at`` (aware UTC datetimes).
    """
    start = month_start(now)
    metered = Q(byok=False)
    totals = UsageRecord.objects.filter(user=user, created_at__gte=start).aggregate(
        metered_in=Sum("input_tokens", filter=metered),
        metered_out=Sum("output_tokens", filter=metered),
        metered_cost=Sum("cost", filter=metered),
        byok_in=Sum("input_tokens", filter=~metered),
        byok_out=Sum("output_tokens", filter=~metered),
        calls=Count("id"),
    )
    input_tokens = totals["metered_in"] or 0
    output_tokens = totals["metered_out"] or 0
    tokens = input_tokens + output_tokens
    plan = plan_for(user)
    quota, spend_limit = plan.monthly_token_quota, plan.monthly_spend_limit
    cost = totals["metered_cost"] or Decimal(0)
    percent = min(100, int(tokens * 100 / quota)) if quota else 0
    spend_percent = min(100, int(cost * 100 / spend_limit)) if spend_limit else 0
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tokens": tokens,
        "cost": cost,
        "spend_limit": spend_limit,
        "spend_percent": spend_percent,
        "byok_tokens": (totals["byok_in"] or 0) + (totals["byok_out"] or 0),
        "requests": totals["calls"] or 0,
        "quota": quota,
        "percent": percent,
        "exhausted": (bool(quota) and tokens >= quota)
        or (bool(spend_limit) and cost >= spend_limit),
        "period_start": start,
        "resets_at": next_month_start(now),
    }


def usage_line(user: Any) -> str:
    """This month's model use of ``user`` in one line, for staff pages."""
    usage = month_usage(user)
    return (
        f"{usage['tokens']:,} tokens ({usage['input_tokens']:,} in, "
        f"{usage['output_tokens']:,} out) · USD {usage['cost']:.4f} · "
        f"{usage['requests']:,} calls · {usage['byok_tokens']:,} tokens on their own keys"
    )
