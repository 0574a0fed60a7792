"""Sandboxes (one OpenClaw gateway each), the runtime images they run, and their event log.

State changes happen only in sandboxes.actions; this module holds the data and the behaviour
of one object.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import models
from django.utils import timezone

from portal.lib.fields import EncryptedTextField


class RuntimeImage(models.Model):
    """A built, read-only directory holding Node and one pinned OpenClaw version."""

    class Status(models.TextChoices):
        BUILDING = "building"
        READY = "ready"
        FAILED = "failed"

    openclaw_version = models.CharField(max_length=50)
    node_version = models.CharField(max_length=50)
    path = models.CharField(max_length=500, unique=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.BUILDING)
    is_current = models.BooleanField(
        default=False, help_text="Sandboxes move to the current image on their next start."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"openclaw {self.openclaw_version} / node {self.node_version}"


class Sandbox(models.Model):
    """One user's isolated, persistent OpenClaw gateway."""

    class State(models.TextChoices):
        PROVISIONING = "provisioning"
        STARTING = "starting"
        RUNNING = "running"
        SLEEPING = "sleeping"
        STOPPING = "stopping"
        STOPPED = "stopped"
        FAILED = "failed"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="sandboxes"
    )
    name = models.SlugField(max_length=50, default="default")
    state = models.CharField(max_length=20, choices=State.choices, default=State.PROVISIONING)
    backend = models.CharField(max_length=20, default="local")
    backend_state = models.JSONField(default=dict, blank=True)
    runtime = models.ForeignKey(
        RuntimeImage, null=True, blank=True, on_delete=models.PROTECT, related_name="sandboxes"
    )
    gateway_token = EncryptedTextField(blank=True)
    device_private_key = EncryptedTextField(blank=True)
    device_token = EncryptedTextField(blank=True)
    error_message = models.TextField(blank=True)
    last_activity_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    crash_count = models.PositiveIntegerField(
        default=0, help_text="Crashes in a row, each soon after its start (see actions)."
    )
    last_crash_at = models.DateTimeField(null=True, blank=True)
    restart_after = models.DateTimeField(
        null=True, blank=True, help_text="After repeated crashes: no automatic start before this."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "sandboxes"
        permissions = [("operate_sandbox", "Can start, stop and restart sandboxes")]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="one_sandbox_name_per_owner")
        ]
        indexes = [models.Index(fields=["state", "last_activity_at"])]

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def slug(self) -> str:
        """A filesystem- and cgroup-safe unique name."""
        return f"sbx-{self.pk}"

    @property
    def data_dir(self) -> Path:
        return Path(settings.HERMIT_DATA_DIR) / "sandboxes" / str(self.pk)

    def is_idle(self, now: datetime, sleep_after: timedelta | None) -> bool:
        """Return True if a running sandbox has had no activity for ``sleep_after``."""
        if sleep_after is None or self.state != self.State.RUNNING:
            return False
        return now - self.last_activity_at >= sleep_after

    def in_crash_backoff(self, now: datetime) -> bool:
        """Return True if repeated crashes hold off automatic starts at ``now``."""
        return self.restart_after is not None and now < self.restart_after

    @property
    def is_up(self) -> bool:
        return self.state == self.State.RUNNING


class SandboxEvent(models.Model):
    """One thing that happened to a sandbox: a transition, a progress step, a staff action."""

    class Actor(models.TextChoices):
        USER = "user"
        STAFF = "staff"
        SYSTEM = "system"

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=10, choices=Actor.choices, default=Actor.SYSTEM)
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    kind = models.CharField(max_length=40)
    message = models.TextField(blank=True)
    progress = models.PositiveSmallIntegerField(null=True, blank=True)
    state = models.CharField(max_length=20, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class SpentControlUITicket(models.Model):
    """A Control UI ticket's nonce, once redeemed: the unique key makes a second redemption
    fail in the database, atomically, whatever the cache backend (controlui_auth). Rows older
    than a ticket's lifetime are purged when tickets are redeemed."""

    nonce = models.CharField(max_length=64, unique=True)
    spent_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"ticket spent at {self.spent_at:%Y-%m-%d %H:%M:%S}"
