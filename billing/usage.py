"""This month's AI usage of one user, for the dashboard.

Tokens that count against the quota are the metered ones (operator-paid); calls paid with the
user's own key (BYOK) are shown separately and do not use up the quota.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db.models import Count, Q, Sum

from billing.ai_gateway.limits import month_start, next_month_start
from billing.ai_gateway.models import UsageRecord
from billing.models import plan_for


def month_usage(user: Any, now: datetime | None = None) -> dict[str, Any]:
    """Return this calendar month's usage for ``user``.

    Keys: ``input_tokens``, ``output_tokens``, ``tokens`` (metered, input + output), ``cost``
    (Decimal, metered calls), ``byok_tokens``, ``requests``, ``quota`` (0 = unlimited),
    ``percent`` (0-100, of the quota; 0 when unlimited), ``exhausted`` (bool),
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
    quota = plan_for(user).monthly_token_quota
    percent = min(100, int(tokens * 100 / quota)) if quota else 0
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tokens": tokens,
        "cost": totals["metered_cost"] or Decimal(0),
        "byok_tokens": (totals["byok_in"] or 0) + (totals["byok_out"] or 0),
        "requests": totals["calls"] or 0,
        "quota": quota,
        "percent": percent,
        "exhausted": bool(quota) and tokens >= quota,
        "period_start": start,
        "resets_at": next_month_start(now),
    }
