"""What each user's sandboxes used, per metering interval and per day.

Three tables:

- ``UsageSample``: one running or dozing sandbox in one interval (HERMIT_METERING_INTERVAL
  seconds, aligned to the epoch). Unique on (sandbox, interval_start): an interval is metered
  once. It keeps the backend's cumulative CPU counter and the counter's epoch (the sandbox's
  ``started_at``), from which the next interval's CPU is a difference. Pruned after
  HERMIT_METERING_KEEP_DAYS.
- ``StorageSample``: one sandbox's backup storage on one day. Unique on (sandbox, day).
- ``DailyUsage``: the roll-up, per user per day, written in the same transaction as the samples
  it adds (see metering.sampling); kept for good. Reports read only this table and the AI
  gateway's own UsageRecord rows (model tokens and cost are never copied here).

Rows name the user the sandbox belonged to when it was sampled, so usage stays with whoever
used it when a sandbox changes owner (a warm-pool gateway adopted by a new user).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class UsageSample(models.Model):
    """One running or dozing sandbox in one metering interval."""

    sandbox = models.ForeignKey(  # indexed by the unique key, which it leads
        "sandboxes.Sandbox", null=True, on_delete=models.SET_NULL, related_name="+", db_index=False
    )
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    interval_start = models.DateTimeField(db_index=True)
    seconds = models.PositiveIntegerField(help_text="The interval's length.")
    dozing = models.BooleanField(default=False)
    cpu_counter = models.FloatField(help_text="The backend's cumulative CPU seconds, as read.")
    counter_since = models.DateTimeField(
        null=True, help_text="The counter's epoch: the sandbox's start (or restore)."
    )
    cpu_ms = models.BigIntegerField(help_text="CPU milliseconds counted for this interval.")
    memory_bytes = models.BigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["sandbox", "interval_start"], name="one_usage_sample_per_interval"
            )
        ]

    def __str__(self) -> str:
        return f"sandbox {self.sandbox_id} at {self.interval_start:%Y-%m-%d %H:%M}"


class StorageSample(models.Model):
    """One sandbox's backup storage on one day (see metering.sampling for what is counted)."""

    sandbox = models.ForeignKey(  # indexed by the unique key, which it leads
        "sandboxes.Sandbox", null=True, on_delete=models.SET_NULL, related_name="+", db_index=False
    )
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    day = models.DateField(db_index=True)
    stored_bytes = models.BigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["sandbox", "day"], name="one_storage_sample_per_day")
        ]

    def __str__(self) -> str:
        return f"sandbox {self.sandbox_id} on {self.day}"


class DailyUsage(models.Model):
    """One user's sandbox usage on one UTC day: the sum of that day's samples."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="daily_usage"
    )
    day = models.DateField()
    plan = models.ForeignKey(
        "billing.Plan",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The user's plan when last sampled that day (revenue is counted by day).",
    )
    cpu_ms = models.BigIntegerField(default=0)
    memory_byte_seconds = models.BigIntegerField(default=0)
    awake_seconds = models.BigIntegerField(default=0, help_text="Sampled while running.")
    dozing_seconds = models.BigIntegerField(default=0, help_text="Sampled while dozing.")
    storage_bytes = models.BigIntegerField(default=0, help_text="Byte-days of backups.")

    class Meta:
        verbose_name = "usage and cost"
        verbose_name_plural = "usage and cost"
        permissions = [("view_costs", "Can see every user's usage, cost, revenue and margin")]
        constraints = [
            models.UniqueConstraint(fields=["user", "day"], name="one_daily_usage_per_user_day")
        ]

    def __str__(self) -> str:
        return f"{self.user_id} on {self.day}"
