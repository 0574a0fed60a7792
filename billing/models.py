"""Plans (tiers), each user's account on one of them, and the record of every plan change.

An account's plan changes only through :func:`billing.subscriptions.change_plan`, which records a
:class:`PlanChange`. Stripe's side of an account (customer, subscription, its status and period)
is written by the webhook only (``billing.subscriptions``); each Stripe event applied is kept as a
:class:`StripeEvent`, in the same transaction as its effect.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone


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
    browser = models.BooleanField(
        default=False,
        help_text="Agents get a headless Chromium they drive with the browser tool (started on "
        "first use, inside the sandbox). Useful with internet only.",
    )
    browser_memory_mb = models.PositiveIntegerField(
        default=1024,
        help_text="Memory added to the sandbox's limit for its browser, when the browser is on.",
    )
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
    public = models.BooleanField(default=False, help_text="Listed on the public pricing page.")
    stripe_price_id = models.CharField(
        max_length=255,
        blank=True,
        help_text="The Stripe Price (price_...) users pay for this plan; empty = not for sale.",
    )

    class Meta:
        ordering = ["monthly_token_quota"]
        permissions = [("change_plan_price", "Can change plan prices")]
        constraints = [
            models.UniqueConstraint(
                fields=["stripe_price_id"],
                condition=~models.Q(stripe_price_id=""),
                name="plan_unique_stripe_price",
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def sleep_minutes(self) -> int:
        return int(self.sleep_after.total_seconds() // 60) if self.sleep_after else 0

    def sleeps_after(self) -> timedelta | None:
        """Return the idle time after which a sandbox sleeps, or None if it never sleeps."""
        return self.sleep_after if self.sleeps else None

    @property
    def sleep_policy(self) -> str:
        """The sleep policy in a few words, for the dashboard: "always on" / "sleeps when idle"."""
        return "sleeps when idle" if self.sleeps else "always on"

    @property
    def is_paid(self) -> bool:
        return self.price_monthly > 0

    @property
    def sandbox_memory_mb(self) -> int:
        """The sandbox's whole memory limit: the agent's memory, plus the browser's share when
        the browser is on (Chromium runs inside the sandbox, in the same cgroup)."""
        return self.memory_mb + (self.browser_memory_mb if self.browser else 0)

    def limits(self) -> tuple[int, int, int, bool, bool]:
        """What a sandbox on this plan is started with and keeps until it stops: memory (MB,
        the whole limit), CPU (millicores), processes, internet, browser. Two plans with equal
        limits run the same gateway; a change of any of them needs a restart to reach a
        running one."""
        memory = self.sandbox_memory_mb
        return (memory, self.cpu_millis, self.pids_max, self.internet, self.browser)


class Account(models.Model):
    """A user's billing account: which plan they are on."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="account"
    )
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="accounts")
    created_at = models.DateTimeField(auto_now_add=True)
    stripe_customer_id = models.CharField(max_length=255, blank=True, db_index=True)
    stripe_subscription_id = models.CharField(max_length=255, blank=True, db_index=True)
    subscription_status = models.CharField(
        max_length=32, blank=True, help_text="Stripe's status of the subscription (active, ...)."
    )
    current_period_end = models.DateTimeField(null=True, blank=True)
    cancel_at_period_end = models.BooleanField(
        default=False, help_text="The subscription ends (back to the default plan) at period end."
    )
    grace_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="A payment failed: the plan drops to the default one at this time unless paid.",
    )
    checkout_session_id = models.CharField(
        max_length=255,
        blank=True,
        help_text="The Stripe Checkout Session last opened; an older one is expired at Stripe.",
    )
    cancel_requested_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="The account is being deleted: its Stripe subscriptions are cancelled (retried "
        "by the reconcile task until Stripe confirms).",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["stripe_customer_id"],
                condition=~models.Q(stripe_customer_id=""),
                name="account_unique_stripe_customer",
            )
        ]

    def __str__(self) -> str:
        return f"{self.user} on {self.plan}"

    def in_grace(self, now: datetime) -> bool:
        return self.grace_until is not None and self.grace_until > now


class PlanChange(models.Model):
    """One change of an account's plan: from, to, why, by whom, and when."""

    class Source(models.TextChoices):
        STRIPE = "stripe", "Stripe"
        STAFF = "staff", "Staff"
        GRACE = "grace", "Grace period ended"
        DELETION = "deletion", "Account deleted"

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="plan_changes")
    from_plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="+")
    to_plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="+")
    source = models.CharField(max_length=16, choices=Source.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The staff member who made the change, if any.",
    )
    reason = models.CharField(max_length=255, blank=True)
    stripe_event_id = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.from_plan} → {self.to_plan} ({self.get_source_display()})"


class StripeEvent(models.Model):
    """A Stripe event already applied: its id is stored with its effect, so a replay is a no-op."""

    id = models.CharField(primary_key=True, max_length=255)
    type = models.CharField(max_length=100)
    received_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.type} {self.id}"


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
        "browser": False,  # no internet: a browser would reach nothing
        "browser_memory_mb": 1024,
        "max_sandboxes": 1,
        "backup_interval": timedelta(days=1),
        "backup_keep_last": 0,
        "backup_keep_daily": 7,
        "backup_keep_weekly": 0,
        "price_monthly": Decimal("0.00"),
        "public": True,
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
        "browser": True,
        "browser_memory_mb": 1024,
        "max_sandboxes": 3,
        "backup_interval": timedelta(hours=1),
        "backup_keep_last": 24,
        "backup_keep_daily": 7,
        "backup_keep_weekly": 4,
        "price_monthly": Decimal("12.00"),
        "public": True,
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
