"""Usage into US dollars: the operator's cost, the revenue, the margin. Pure functions.

Rates come from three settings (strings, parsed here and nowhere else): HERMIT_COST_VCPU_HOUR,
HERMIT_COST_RAM_GB_HOUR and HERMIT_COST_STORAGE_GB_MONTH (their source is noted in
portal/settings.py). A GB is 2**30 bytes, as a server's RAM and R2's storage are counted.

- compute = CPU-seconds / 3600 * vCPU-hour + memory GB-hours * RAM GB-hour
- storage = storage GB-days / days in the month * storage GB-month
- model = the AI gateway's recorded cost of calls on the operator's keys; calls on a user's own
  key (BYOK) are counted in tokens but cost the operator nothing
- revenue accrues by day: each day of the month (from the user's sign-up, up to today for the
  current month) earns its plan's ``price_monthly`` / days in the month. A day's plan is the
  one in force at its end, from billing's PlanChange history (metering.reports): the plan the
  last change made on or before that day moved to, else the plan the first change moved from,
  else the current plan. Whether the user used anything that day does not matter. So a
  mid-month change is prorated by the days on each plan, and a finished month on one plan earns
  exactly its price. Revenue is what the plans' list prices say was earned, not what Stripe
  collected: every day on a plan with a price counts, including a plan staff gave by hand
  (nothing records a plan as complimentary, so it counts at its list price) and days in a
  failed payment's grace period; days on a free plan earn nothing.
- margin = revenue - total cost

Every amount is rounded half-up to 0.0001 USD (a free user costs cents a month); the total is
the sum of the rounded parts, so a table's columns add up. Figures shown with fewer decimals
(CPU-seconds, GB-hours, hours awake) are rounded half-up too, with :func:`rounded`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

GIB = 2**30
USD = Decimal("0.0001")
ZERO = Decimal(0)


@dataclass(frozen=True)
class Rates:
    vcpu_hour: Decimal
    ram_gb_hour: Decimal
    storage_gb_month: Decimal


def _rate(name: str) -> Decimal:
    raw = getattr(settings, name)
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise ImproperlyConfigured(f"{name} must be a number of US dollars, not {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise ImproperlyConfigured(f"{name} must be a number of US dollars >= 0, not {raw!r}")
    return value


def rates() -> Rates:
    """Return the operator's cost rates from settings. Raise ImproperlyConfigured if one is not
    a non-negative number."""
    return Rates(
        vcpu_hour=_rate("HERMIT_COST_VCPU_HOUR"),
        ram_gb_hour=_rate("HERMIT_COST_RAM_GB_HOUR"),
        storage_gb_month=_rate("HERMIT_COST_STORAGE_GB_MONTH"),
    )


def usd(amount: Decimal) -> Decimal:
    """Return ``amount`` rounded half-up to 0.0001 USD."""
    return amount.quantize(USD, rounding=ROUND_HALF_UP)


def rounded(amount: Decimal, places: int) -> Decimal:
    """Return ``amount`` rounded half-up to ``places`` decimals (figures are shown so: Python's
    own formatting rounds half to even)."""
    return amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Usage:
    """What one user used in a period (sums of DailyUsage and UsageRecord rows)."""

    cpu_ms: int = 0
    memory_byte_seconds: int = 0
    storage_byte_days: int = 0
    awake_seconds: int = 0
    dozing_seconds: int = 0
    tokens: int = 0  # every model token, BYOK included
    byok_tokens: int = 0
    model_cost: Decimal = ZERO  # operator-paid calls only

    @property
    def cpu_seconds(self) -> Decimal:
        return Decimal(self.cpu_ms) / 1000

    @property
    def gb_hours(self) -> Decimal:
        return Decimal(self.memory_byte_seconds) / (GIB * 3600)

    @property
    def gb_days(self) -> Decimal:
        return Decimal(self.storage_byte_days) / GIB

    @property
    def awake_hours(self) -> Decimal:
        return Decimal(self.awake_seconds) / 3600


@dataclass(frozen=True)
class Cost:
    compute: Decimal
    storage: Decimal
    model: Decimal

    @property
    def total(self) -> Decimal:
        return self.compute + self.storage + self.model


def cost(usage: Usage, days_in_month: int, rate: Rates) -> Cost:
    """Return what ``usage`` cost the operator, in a month of ``days_in_month`` days."""
    compute = usage.cpu_seconds / 3600 * rate.vcpu_hour + usage.gb_hours * rate.ram_gb_hour
    storage = usage.gb_days / days_in_month * rate.storage_gb_month
    return Cost(compute=usd(compute), storage=usd(storage), model=usd(usage.model_cost))


def revenue(days_by_price: dict[Decimal, int], days_in_month: int) -> Decimal:
    """Return the revenue of a month in which the user spent ``days`` days on a plan priced
    ``price`` a month, for each (price, days)."""
    earned = sum(
        (price * days / days_in_month for price, days in days_by_price.items()), start=ZERO
    )
    return usd(earned)
