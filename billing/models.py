"""Plans (tiers) and each user's account on one of them."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models


class Plan(models.Model):
    """A tier: how a user's sandboxes sleep, what they may use, and what limits them."""

    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=100)
    is_default = models.BooleanField(
        default=False, help_text="New users start on the default plan. Exactly one should be set."
    )
    sleeps = models.BooleanField(default=True, help_text="Whether idle sandboxes are put to sleep.")
    sleep_after = models.DurationField(
        null=True, blank=True, default=timedelta(minutes=15), help_text="Idle time before sleep."
    )
    monthly_token_quota = models.BigIntegerField(
        default=1_000_000, help_text="Model tokens a month through the AI gateway; 0 = unlimited."
    )
    monthly_spend_limit = models.DecimalField(
        max_digits=10,
        decimal_places=2,
        default=Decimal("1.00"),
        help_text="USD of model calls a month on Hermit's keys, priced from the AI gateway's "
        "price table; 0 = unlimited.",
    )
    requests_per_minute = models.PositiveIntegerField(default=20)
    memory_mb = models.PositiveIntegerField(default=1536)
    cpu_millis = models.PositiveIntegerField(default=1000, help_text="1000 = one full core.")
    pids_max = models.PositiveIntegerField(default=512)
    internet = models.BooleanField(default=False, help_text="Sandboxes may reach the internet.")
    max_sandboxes = models.PositiveIntegerField(default=1)
    backup_interval = models.DurationField(
        null=True,
        blank=True,
        default=timedelta(days=1),
        help_text="Time between scheduled backups; empty = no scheduled backups. Sandboxes are "
        "also backed up when they sleep or stop.",
    )
    backup_keep_last = models.PositiveIntegerField(
        default=0, help_text="Snapshots kept: the most recent N."
    )
    backup_keep_daily = models.PositiveIntegerField(
        default=7, help_text="Snapshots kept: the last one of each of the last N days."
    )
    backup_keep_weekly = models.PositiveIntegerField(
        default=0, help_text="Snapshots kept: the last one of each of the last N weeks."
    )
    price_monthly = models.DecimalField(
        max_digits=8,
        decimal_places=2,
        default=Decimal("0.00"),
        help_text="USD a month; 0 = free. Shown on the pricing page and counted as revenue.",
    )

    class Meta:
        ordering = ["monthly_token_quota"]

    def __str__(self) -> str:
        return self.name

    @property
    def sleep_minutes(self) -> int:
        return int(self.sleep_after.total_seconds() // 60) if self.sleep_after else 0

    def sleeps_after(self) -> timedelta | None:
        """Return the idle time after which a sandbox sleeps, or None if it never sleeps."""
        return self.sleep_after if self.sleeps else None


class Account(models.Model):
    """A user's billing account: which plan they are on."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="account"
    )
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="accounts")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.user} on {self.plan}"


# The tiers every installation starts with (the 0002 migration seeds a frozen copy).
STANDARD_PLANS: dict[str, dict[str, Any]] = {
    "free": {
        "name": "Free",
        "is_default": True,
        "sleeps": True,
        "sleep_after": timedelta(minutes=15),
        "monthly_token_quota": 1_000_000,
        "monthly_spend_limit": Decimal("1.00"),
        "requests_per_minute": 20,
        "memory_mb": 1536,
        "cpu_millis": 1000,
        "pids_max": 512,
        "internet": False,
        "max_sandboxes": 1,
        "backup_interval": timedelta(days=1),
        "backup_keep_last": 0,
        "backup_keep_daily": 7,
        "backup_keep_weekly": 0,
        "price_monthly": Decimal("0.00"),
    },
    "pro": {
        "name": "Pro",
        "is_default": False,
        "sleeps": False,
        "sleep_after": None,
        "monthly_token_quota": 20_000_000,
        "monthly_spend_limit": Decimal("20.00"),
        "requests_per_minute": 120,
        "memory_mb": 2048,
        "cpu_millis": 2000,
        "pids_max": 1024,
        "internet": True,
        "max_sandboxes": 3,
        "backup_interval": timedelta(hours=1),
        "backup_keep_last": 24,
        "backup_keep_daily": 7,
        "backup_keep_weekly": 4,
        "price_monthly": Decimal("12.00"),
    },
}


def ensure_standard_plans() -> None:
    """Create the free and pro plans if they are missing; never changes staff's edits."""
    for slug, fields in STANDARD_PLANS.items():
        Plan.objects.get_or_create(slug=slug, defaults=fields)


def default_plan() -> Plan:
    """Return the plan new users start on: the one marked default, else 'free' (recreating the
    standard plans if the table was emptied)."""
    plan = Plan.objects.filter(is_default=True).first()
    if plan is None:
        ensure_standard_plans()
        plan = Plan.objects.get(slug="free")
    return plan


def plan_for(user: Any) -> Plan:
    """Return the user's plan, creating their account on the default plan if missing."""
    account, _ = Account.objects.select_related("plan").get_or_create(
        user=user, defaults={"plan": default_plan()}
    )
    return account.plan
