"""What the pricing page says about each public plan, in words (no side effects).

:func:`public_plans` returns the plans staff marked public, cheapest first; :func:`describe`
turns one plan into the lines the page shows: price, sleep policy, limits and backups. Only
what is enforced is listed (``Plan.max_sandboxes`` is not: every user has one agent).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from billing.models import Plan


@dataclass(frozen=True)
class PlanFacts:
    plan: Plan
    price: str
    sleep_policy: str
    facts: list[tuple[str, str]]


def public_plans() -> list[Plan]:
    return list(Plan.objects.filter(public=True).order_by("price_monthly", "name"))


def describe(plan: Plan) -> PlanFacts:
    return PlanFacts(
        plan=plan,
        price=price(plan.price_monthly),
        sleep_policy=sleep_policy(plan),
        facts=[
            ("Model tokens", tokens(plan.monthly_token_quota)),
            ("Model spend", spend(plan.monthly_spend_limit)),
            ("Requests", f"{plan.requests_per_minute} a minute"),
            ("Memory", memory(plan.memory_mb)),
            ("CPU", cpu(plan.cpu_millis)),
            ("Internet", "Yes" if plan.internet else "No (model calls only)"),
            ("Web browser", browser(plan)),
            ("Backups", backups(plan)),
        ],
    )


def price(amount: Decimal) -> str:
    if amount <= 0:
        return "Free"
    whole = amount == amount.to_integral_value()
    return f"${amount:.0f} / month" if whole else f"${amount:.2f} / month"


def browser(plan: Plan) -> str:
    if not plan.browser:
        return "No"
    return f"Yes: its own Chromium, with {memory(plan.browser_memory_mb)} more memory"


def sleep_policy(plan: Plan) -> str:
    if plan.sleeps_after() is None:
        return "Always on"
    return "Sleeps when idle, wakes in about a second"


def tokens(quota: int) -> str:
    if not quota:
        return "Unlimited"
    if quota % 1_000_000 == 0:
        return f"{quota // 1_000_000}M a month"
    if quota % 1_000 == 0:
        return f"{quota // 1_000}k a month"
    return f"{quota:,} a month"


def spend(limit: Decimal) -> str:
    return "Unlimited" if limit <= 0 else f"up to ${limit:.2f} a month"


def memory(mb: int) -> str:
    if mb % 1024 == 0 or (mb >= 1024 and mb % 512 == 0):
        return f"{mb / 1024:g} GB"
    return f"{mb} MB"


def cpu(millis: int) -> str:
    cores = millis / 1000
    return f"{cores:g} core" if cores <= 1 else f"{cores:g} cores"


def every(interval: timedelta) -> str:
    seconds = int(interval.total_seconds())
    for unit, size, word in (("day", 86400, "Daily"), ("hour", 3600, "Hourly")):
        if seconds == size:
            return word
        if seconds % size == 0:
            return f"Every {seconds // size} {unit}s"
    return f"Every {max(1, seconds // 60)} minutes"


def backups(plan: Plan) -> str:
    schedule = every(plan.backup_interval) if plan.backup_interval else "When it sleeps or stops"
    kept = [
        f"the last {plan.backup_keep_last}" if plan.backup_keep_last else "",
        f"{plan.backup_keep_daily} daily" if plan.backup_keep_daily else "",
        f"{plan.backup_keep_weekly} weekly" if plan.backup_keep_weekly else "",
    ]
    kept = [k for k in kept if k]
    if not kept:
        return schedule
    listed = kept[0] if len(kept) == 1 else ", ".join(kept[:-1]) + " and " + kept[-1]
    return f"{schedule}, keeping {listed}"
