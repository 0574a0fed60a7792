"""Monthly usage and cost, read from DailyUsage (sandboxes) and UsageRecord (model calls).

Reports aggregate by query: the daily roll-up keeps a month of one user to 31 rows, so the staff
table is the same few queries (GROUP BY usage and model calls, the plan history, the users)
whatever the fleet's size, and the model figures are the AI gateway's own records, summed where
they are (never copied). The queries are plain ORM ones, so they run on SQLite (the default
database) as on PostgreSQL. Months and days are UTC; a month is one of the years 2000-9998.

- :func:`cost_rows`: one row per user who used anything in the month or earned revenue in it
  (the warm pool's own account is left out and reported apart, see :func:`fleet`). Revenue is
  priced day by day from billing's PlanChange history (see metering.pricing for which days
  count), read in two queries: each account's plan when the month began, and the month's
  changes; so the table's queries do not grow with the fleet, and no per-day rows are loaded.
  A row's plan is the user's current one.
- :func:`fleet`: the month's cost per always-on user (plans that never sleep) and per user of
  a plan that sleeps, each over every account that existed in the month (idle ones too).
- :func:`user_month`: one user's month by day, for their charts (reached through
  metering.access only).
Costs, revenue and margin are computed in metering.pricing.
"""

from __future__ import annotations

import calendar
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Count, Exists, F, OuterRef, Q, Subquery, Sum
from django.db.models.functions import Coalesce, TruncDate

from ai_gateway.models import UsageRecord
from billing.models import Account, Plan, PlanChange, default_plan
from metering.models import DailyUsage
from metering.pricing import ZERO, Cost, Usage, cost, rates, revenue, usd
from sandboxes.pool import POOL_USERNAME

MIN_YEAR, MAX_YEAR = 2000, 9998  # the months Month.parse accepts
SANDBOX_FIELDS = ("cpu_ms", "memory_byte_seconds", "awake_seconds", "dozing_seconds")


@dataclass(frozen=True)
class Month:
    """A calendar month (UTC), named by its first day."""

    first: date

    @classmethod
    def of(cls, moment: datetime) -> Month:
        return cls(moment.astimezone(UTC).date().replace(day=1))

    @classmethod
    def parse(cls, value: str) -> Month:
        """Return the month written ``YYYY-MM``, in a year from MIN_YEAR to MAX_YEAR (so its
        neighbours and its end are dates too). Raise ValueError otherwise."""
        try:
            parsed = datetime.strptime(value, "%Y-%m")  # noqa: DTZ007 (a date, no time)
        except ValueError:
            raise ValueError(f"A month is written like 2026-11, not {value!r}.") from None
        if not MIN_YEAR <= parsed.year <= MAX_YEAR:
            raise ValueError(
                f"A month's year must be between {MIN_YEAR} and {MAX_YEAR}, not {parsed.year}."
            )
        return cls(parsed.date())

    @property
    def days(self) -> int:
        return calendar.monthrange(self.first.year, self.first.month)[1]

    @property
    def last(self) -> date:
        return self.first.replace(day=self.days)

    @property
    def start(self) -> datetime:
        return datetime(self.first.year, self.first.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)

    @property
    def previous(self) -> Month:
        return Month((self.first - timedelta(days=1)).replace(day=1))

    @property
    def next(self) -> Month:
        return Month(self.last + timedelta(days=1))

    def __str__(self) -> str:
        return f"{self.first:%Y-%m}"

    @property
    def label(self) -> str:
        return f"{self.first:%B %Y}"

    def dates(self) -> list[date]:
        return [self.first + timedelta(days=n) for n in range(self.days)]

    def days_counted(self, today: date, joined: date) -> int:
        """Return the days of this month from ``joined`` up to ``today``, both included."""
        first, last = max(self.first, joined), min(self.last, today)
        return max(0, (last - first).days + 1)


@dataclass(frozen=True)
class CostRow:
    user_id: int
    user: str
    plan: str
    plan_slug: str
    always_on: bool
    usage: Usage
    cost: Cost
    revenue: Decimal

    @property
    def margin(self) -> Decimal:
        return self.revenue - self.cost.total


@dataclass(frozen=True)
class Fleet:
    always_on_users: int
    always_on_cost: Decimal  # the month's total for them
    sleeping_users: int
    sleeping_cost: Decimal
    pool_cost: Decimal  # the warm pool's gateways, nobody's yet

    @property
    def per_always_on_user(self) -> Decimal | None:
        return _per(self.always_on_cost, self.always_on_users)

    @property
    def per_sleeping_user(self) -> Decimal | None:
        return _per(self.sleeping_cost, self.sleeping_users)


def _per(total: Decimal, users: int) -> Decimal | None:
    return usd(total / users) if users else None


SORT_KEYS: dict[str, Callable[[CostRow], Any]] = {
    "user": lambda r: r.user.lower(),
    "plan": lambda r: r.plan.lower(),
    "cpu": lambda r: r.usage.cpu_ms,
    "gb_hours": lambda r: r.usage.memory_byte_seconds,
    "gb_days": lambda r: r.usage.storage_byte_days,
    "tokens": lambda r: r.usage.tokens,
    "compute": lambda r: r.cost.compute,
    "storage": lambda r: r.cost.storage,
    "model": lambda r: r.cost.model,
    "total": lambda r: r.cost.total,
    "revenue": lambda r: r.revenue,
    "margin": lambda r: r.margin,
}


def sort_rows(rows: list[CostRow], order: str) -> list[CostRow]:
    """Return ``rows`` sorted by ``order``: a SORT_KEYS name, "-" first for descending. An
    unknown name sorts by user."""
    name = order.lstrip("-")
    key = SORT_KEYS.get(name, SORT_KEYS["user"])
    by_user = sorted(rows, key=SORT_KEYS["user"])
    return sorted(by_user, key=key, reverse=order.startswith("-") and name in SORT_KEYS)


def total_row(rows: list[CostRow], label: str = "Total") -> CostRow:
    """Return one row adding up ``rows`` (usage, each cost, revenue; so the margin too)."""

    def add(value: Callable[[CostRow], Any]) -> Any:
        return sum((value(r) for r in rows), start=0)

    usage = Usage(
        cpu_ms=add(lambda r: r.usage.cpu_ms),
        memory_byte_seconds=add(lambda r: r.usage.memory_byte_seconds),
        storage_byte_days=add(lambda r: r.usage.storage_byte_days),
        awake_seconds=add(lambda r: r.usage.awake_seconds),
        dozing_seconds=add(lambda r: r.usage.dozing_seconds),
        tokens=add(lambda r: r.usage.tokens),
        byok_tokens=add(lambda r: r.usage.byok_tokens),
        model_cost=ZERO + add(lambda r: r.usage.model_cost),
    )
    spent = Cost(
        compute=ZERO + add(lambda r: r.cost.compute),
        storage=ZERO + add(lambda r: r.cost.storage),
        model=ZERO + add(lambda r: r.cost.model),
    )
    revenue_sum = ZERO + add(lambda r: r.revenue)
    return CostRow(0, label, "", "", False, usage, spent, revenue_sum)


def _sandbox_usage(
    month: Month, user_ids: Iterable[int] | None = None
) -> dict[int, dict[str, Any]]:
    rows = DailyUsage.objects.filter(day__gte=month.first, day__lte=month.last)
    if user_ids is not None:
        rows = rows.filter(user_id__in=list(user_ids))
    sums = rows.values("user_id").annotate(
        **{name: Sum(name) for name in (*SANDBOX_FIELDS, "storage_bytes")}
    )
    return {row["user_id"]: dict(row) for row in sums}


def _model_usage(month: Month, user_ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
    rows = UsageRecord.objects.filter(
        created_at__gte=month.start, created_at__lt=month.end, user__isnull=False
    )
    if user_ids is not None:
        rows = rows.filter(user_id__in=list(user_ids))
    sums = rows.values("user_id").annotate(
        tokens=Sum(F("input_tokens") + F("output_tokens")),
        byok_tokens=Sum(F("input_tokens") + F("output_tokens"), filter=Q(byok=True)),
        model_cost=Sum("cost", filter=Q(byok=False)),
    )
    return {row["user_id"]: dict(row) for row in sums}


def _usage(sandbox: dict[str, Any] | None, model: dict[str, Any] | None) -> Usage:
    sandbox, model = sandbox or {}, model or {}
    return Usage(
        cpu_ms=sandbox.get("cpu_ms") or 0,
        memory_byte_seconds=sandbox.get("memory_byte_seconds") or 0,
        storage_byte_days=sandbox.get("storage_bytes") or 0,
        awake_seconds=sandbox.get("awake_seconds") or 0,
        dozing_seconds=sandbox.get("dozing_seconds") or 0,
        tokens=model.get("tokens") or 0,
        byok_tokens=model.get("byok_tokens") or 0,
        model_cost=model.get("model_cost") or ZERO,
    )


def _revenue(month: Month, today: date) -> dict[int, Decimal]:
    """Revenue by user id, of every user who earned any in ``month`` (see :func:`revenue_days`)."""
    first, last = month.first, min(month.last, today)
    if last < first:
        return {}
    openings, changes = _plan_history(month)
    earned = {}
    for user_id, (joined, opening) in openings.items():
        days = revenue_days(max(first, joined), last, opening, changes.get(user_id, []))
        if days:
            earned[user_id] = revenue(days, month.days)
    return earned


def revenue_days(
    first: date, last: date, opening: Decimal, changes: list[tuple[date, Decimal]]
) -> dict[Decimal, int]:
    """Return the days from ``first`` to ``last`` (both included) on each paid price: a day is
    at the price of the last of ``changes`` (day, new price; in order) made on or before it,
    else at ``opening``. Days on a free plan are left out."""
    days: dict[Decimal, int] = defaultdict(int)
    price, start = opening, first
    for day, new_price in changes:
        end = min(day - timedelta(days=1), last)
        if end >= start:
            days[price] += (end - start).days + 1
            start = end + timedelta(days=1)
        price = new_price
    if last >= start:
        days[price] += (last - start).days + 1
    return {p: n for p, n in days.items() if p > 0}


def _plan_history(
    month: Month,
) -> tuple[dict[int, tuple[date, Decimal]], dict[int, list[tuple[date, Decimal]]]]:
    """Return, in two queries whatever the fleet's size: for each account that was on a paid
    plan when ``month`` began or changed plan in it, (its user's UTC sign-up day, the price of
    its plan when the month began); and each such user's changes in the month as (UTC day, new
    price), in order. The plan when the month began is the one the last earlier change moved it
    to, else the one its first change moved it from, else its current plan."""
    changes = PlanChange.objects.filter(account=OuterRef("pk")).order_by("created_at", "id")
    opening = Coalesce(
        Subquery(
            changes.filter(created_at__lt=month.start)
            .order_by("-created_at", "-id")
            .values("to_plan__price_monthly")[:1]
        ),
        Subquery(changes.values("from_plan__price_monthly")[:1]),
        F("plan__price_monthly"),
    )
    in_month = PlanChange.objects.filter(created_at__gte=month.start, created_at__lt=month.end)
    accounts = (
        Account.objects.filter(user__date_joined__lt=month.end)
        .exclude(user__username=POOL_USERNAME)
        .annotate(opening=opening, changed=Exists(in_month.filter(account=OuterRef("pk"))))
        .filter(Q(opening__gt=0) | Q(changed=True))
        .values_list("user_id", "user__date_joined", "opening")
    )
    openings = {
        user_id: (joined.astimezone(UTC).date(), price) for user_id, joined, price in accounts
    }
    moves: dict[int, list[tuple[date, Decimal]]] = defaultdict(list)
    for user_id, at, price in in_month.order_by("created_at", "id").values_list(
        "account__user_id", "created_at", "to_plan__price_monthly"
    ):
        moves[user_id].append((at.astimezone(UTC).date(), price))
    return openings, moves


def _plans(user_ids: Iterable[int]) -> dict[int, Plan]:
    ids = list(user_ids)
    found = {
        a.user_id: a.plan for a in Account.objects.select_related("plan").filter(user_id__in=ids)
    }
    if len(found) < len(ids):
        fallback = default_plan()
        found.update({u: fallback for u in ids if u not in found})
    return found


def cost_rows(month: Month, now: datetime) -> list[CostRow]:
    """Return the month's row of every user who used anything in it or earned revenue in it,
    ordered by user."""
    sandbox, model = _sandbox_usage(month), _model_usage(month)
    earned = _revenue(month, now.astimezone(UTC).date())
    ids = set(sandbox) | set(model) | set(earned)
    users = {
        u.pk: u for u in get_user_model().objects.filter(pk__in=ids).exclude(username=POOL_USERNAME)
    }
    plans = _plans(users)
    rate = rates()
    rows = []
    for user_id, user in users.items():
        usage = _usage(sandbox.get(user_id), model.get(user_id))
        plan = plans[user_id]
        rows.append(
            CostRow(
                user_id=user_id,
                user=user.email or user.username,
                plan=plan.name,
                plan_slug=plan.slug,
                always_on=plan.sleeps_after() is None,
                usage=usage,
                cost=cost(usage, month.days, rate),
                revenue=earned.get(user_id, usd(ZERO)),
            )
        )
    return sort_rows(rows, "user")


def fleet(month: Month, rows: list[CostRow]) -> Fleet:
    """Return the month's cost per always-on and per sleeping user, and what the warm pool's
    gateways cost. ``rows`` are the month's :func:`cost_rows`.

    Each class's cost is the sum of its users' rows; its users are every account that existed
    in the month (signed up before it ended; the warm pool's left out), whether it used
    anything or not, so an idle free user lowers the cost per free user as an idle paying one
    lowers the cost per always-on user. A user's class is their current plan's: always-on if
    it never sleeps, sleeping otherwise (staff's own accounts count like any other)."""
    always_on = [r for r in rows if r.always_on]
    sleeping = [r for r in rows if not r.always_on]
    never_sleeps = Q(plan__sleeps=False) | Q(plan__sleep_after__isnull=True)
    accounts = (
        Account.objects.filter(user__date_joined__lt=month.end)
        .exclude(user__username=POOL_USERNAME)
        .aggregate(
            always_on=Count("pk", filter=never_sleeps), sleeping=Count("pk", filter=~never_sleeps)
        )
    )
    pool = get_user_model().objects.filter(username=POOL_USERNAME).values_list("pk", flat=True)
    pool_ids = list(pool)
    pool_usage = _usage(
        _sandbox_usage(month, pool_ids).get(pool_ids[0]) if pool_ids else None, None
    )
    return Fleet(
        always_on_users=accounts["always_on"],
        always_on_cost=sum((r.cost.total for r in always_on), start=ZERO),
        sleeping_users=accounts["sleeping"],
        sleeping_cost=sum((r.cost.total for r in sleeping), start=ZERO),
        pool_cost=cost(pool_usage, month.days, rates()).total,
    )


@dataclass(frozen=True)
class Day:
    day: date
    usage: Usage
    cost: Cost


@dataclass(frozen=True)
class UserMonth:
    """One user's month. ``cost`` prices the month's whole usage (as the staff table does);
    each day's cost prices that day's alone, rounded to 0.0001 USD on its own, so the days
    can add up (``days_total``) to a few ten-thousandths more or less than the month."""

    month: Month
    days: list[Day]
    usage: Usage
    cost: Cost
    plan: Plan

    @property
    def days_total(self) -> Decimal:
        return sum((d.cost.total for d in self.days), start=ZERO)


def user_month(user: Any, month: Month) -> UserMonth:
    """Return ``user``'s month, day by day. Reach it through metering.access only."""
    daily = {
        row["day"]: row
        for row in DailyUsage.objects.filter(
            user=user, day__gte=month.first, day__lte=month.last
        ).values("day", *SANDBOX_FIELDS, "storage_bytes")
    }
    calls = (
        UsageRecord.objects.filter(user=user, created_at__gte=month.start, created_at__lt=month.end)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day")
        .annotate(
            tokens=Sum(F("input_tokens") + F("output_tokens")),
            byok_tokens=Sum(F("input_tokens") + F("output_tokens"), filter=Q(byok=True)),
            model_cost=Sum("cost", filter=Q(byok=False)),
            calls=Count("id"),
        )
    )
    model = {row["day"]: dict(row) for row in calls}
    rate = rates()
    days = []
    for day in month.dates():
        usage = _usage(daily.get(day), model.get(day))
        days.append(Day(day=day, usage=usage, cost=cost(usage, month.days, rate)))
    total = _usage(
        _sandbox_usage(month, [user.pk]).get(user.pk), _model_usage(month, [user.pk]).get(user.pk)
    )
    return UserMonth(
        month=month,
        days=days,
        usage=total,
        cost=cost(total, month.days, rate),
        plan=_plans([user.pk])[user.pk],
    )
