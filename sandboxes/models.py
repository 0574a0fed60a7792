"""Sandboxes (one OpenClaw gateway each), the runtime images they run, and their event log.

State changes happen only in sandboxes.actions; this module holds the data and the behaviour
of one object.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from portal.lib.fields import EncryptedTextField
from sandboxes.backends.base import sandbox_name


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


class SandboxHost(models.Model):
    """A machine that runs sandboxes: its privileged Celery worker consumes the host's own
    queue (``host.<name>``), runs every task of the sandboxes placed on it, and heartbeats
    this row (sandboxes.hosts). Staff drain a host to empty it; one that stops heartbeating is
    marked lost and its sandboxes are restored elsewhere from their backups."""

    class State(models.TextChoices):
        ACTIVE = "active"  # takes new sandboxes
        DRAINING = "draining"  # takes none; its sandboxes move away as they sleep
        LOST = "lost"  # missed its heartbeats; its sandboxes were moved away

    name = models.CharField(max_length=200, unique=True)
    address = models.CharField(
        max_length=200, blank=True, help_text="Where the portal reaches this host's gateways."
    )
    state = models.CharField(max_length=10, choices=State.choices, default=State.ACTIVE)
    capacity_ram_mb = models.PositiveIntegerField(
        default=0, help_text="The host's RAM in MB (its MemTotal, or HERMIT_HOST_RAM_MB)."
    )
    capacity_sandboxes = models.PositiveIntegerField(
        default=0, help_text="At most this many sandboxes are placed on it (0: no limit)."
    )
    free_ram_mb = models.PositiveIntegerField(
        null=True, blank=True, help_text="MemAvailable at the last heartbeat."
    )
    awake_sandboxes = models.PositiveIntegerField(
        default=0, help_text="Sandboxes awake on it at the last heartbeat."
    )
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def heartbeat_age(self, now: datetime) -> timedelta | None:
        """How long ago it last heartbeated, or None if it never did."""
        return None if self.last_heartbeat is None else now - self.last_heartbeat


class Sandbox(models.Model):
    """One user's isolated, persistent OpenClaw gateway."""

    class State(models.TextChoices):
        PROVISIONING = "provisioning"
        STARTING = "starting"
        RUNNING = "running"
        DOZING = "dozing"  # frozen in place: RAM kept, thawed in milliseconds
        SLEEPING = "sleeping"  # nothing runs; woken from its checkpoint if any, else cold
        STOPPING = "stopping"
        STOPPED = "stopped"
        FAILED = "failed"
        RESTORING = "restoring"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="sandboxes"
    )
    name = models.SlugField(max_length=50, default="default")
    state = models.CharField(max_length=20, choices=State.choices, default=State.PROVISIONING)
    backend = models.CharField(max_length=20, default="local")
    backend_state = models.JSONField(default=dict, blank=True)
    host = models.ForeignKey(
        SandboxHost,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="sandboxes",
        help_text="The machine it runs on; its tasks go to that host's queue.",
    )
    claimed_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="A per-sandbox reconcile or sleep pass holds it until then (sandboxes.tasks).",
    )
    runtime = models.ForeignKey(
        RuntimeImage, null=True, blank=True, on_delete=models.PROTECT, related_name="sandboxes"
    )
    runtime_pinned = models.BooleanField(
        default=False,
        help_text="Staff moved it to this runtime: it stays on it instead of moving to the "
        "current one on its next start.",
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
    boot_queued_at = models.DateTimeField(
        null=True, blank=True, help_text="Waiting for a boot slot since (sandboxes.bootqueue)."
    )
    next_job_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the agent's own next scheduled job is due, read before it slept; "
        "beat wakes it shortly before.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "sandboxes"
        permissions = [
            ("operate_sandbox", "Can start, stop and restart sandboxes"),
            ("backup_sandbox", "Can back up sandboxes"),
            ("restore_sandbox", "Can restore sandboxes from a snapshot"),
            ("suspend_user", "Can suspend and unsuspend users"),
            ("delete_account", "Can delete users' accounts"),
            ("view_secrets", "Can see secrets (keys, tokens, passwords) in the admin"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="one_sandbox_name_per_owner")
        ]
        indexes = [models.Index(fields=["state", "last_activity_at"])]

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def slug(self) -> str:
        """A filesystem- and cgroup-safe unique name."""
        return sandbox_name(self.pk)

    def is_idle(self, now: datetime, sleep_after: timedelta | None) -> bool:
        """Return True if a running or dozing sandbox has had no activity for ``sleep_after``."""
        if sleep_after is None or self.state not in (self.State.RUNNING, self.State.DOZING):
            return False
        return now - self.last_activity_at >= sleep_after

    def in_crash_backoff(self, now: datetime) -> bool:
        """Return True if repeated crashes hold off automatic starts at ``now``."""
        return self.restart_after is not None and now < self.restart_after

    @property
    def is_up(self) -> bool:
        return self.state == self.State.RUNNING


class Checkpoint(models.Model):
    """A hibernated sandbox's processes on disk, to wake it in about a second.

    Not a backup: it fits only the data dir it was taken with (``identity``) and the runtime it
    ran, and is dropped (the sandbox then boots cold) when either changed, when it is older than
    HERMIT_CHECKPOINT_MAX_AGE, or when all checkpoints together pass HERMIT_CHECKPOINT_BUDGET_MB.
    """

    sandbox = models.OneToOneField(Sandbox, on_delete=models.CASCADE, related_name="checkpoint")
    location = models.CharField(max_length=1000)
    size_bytes = models.BigIntegerField(default=0)
    identity = models.CharField(max_length=200)
    runtime = models.ForeignKey(
        RuntimeImage, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"checkpoint of {self.sandbox} ({self.size_bytes // 2**20} MB)"


class BootSlot(models.Model):
    """One of a host's HERMIT_MAX_CONCURRENT_BOOTS places for a cold boot (sandboxes.bootqueue).

    Taken with a conditional UPDATE, so two workers never hold one; a worker that dies lets
    its lease run out."""

    host = models.CharField(max_length=200)
    number = models.PositiveSmallIntegerField()
    sandbox = models.OneToOneField(
        Sandbox, null=True, blank=True, on_delete=models.SET_NULL, related_name="boot_slot"
    )
    lease_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["host", "number"], name="one_boot_slot_per_number")
        ]

    def __str__(self) -> str:
        return f"boot slot {self.number} on {self.host}"


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


def _new_repo_password() -> str:
    return secrets.token_urlsafe(32)


def _new_repo_id() -> str:
    return secrets.token_hex(8)


class BackupRepository(models.Model):
    """A sandbox's restic repository: where it lives, its own password, and the lease that
    keeps two backups or restores of one sandbox from running at once.

    The lease (lock_token, lock_kind, locked_until) is claimed and renewed only by
    sandboxes.backups.actions with conditional UPDATEs; a worker that dies lets it expire."""

    class LockKind(models.TextChoices):
        BACKUP = "backup"
        RESTORE = "restore"
        EXPORT = "export"
        CHECK = "check"

    sandbox = models.OneToOneField(Sandbox, on_delete=models.CASCADE, related_name="backup_repo")
    password = EncryptedTextField(default=_new_repo_password)
    repo_id = models.CharField(
        max_length=32,
        default=_new_repo_id,
        help_text="Random, part of the location, so a new repository never meets an old one.",
    )
    location = models.CharField(max_length=1000, blank=True)
    initialized_at = models.DateTimeField(null=True, blank=True)
    last_backup_at = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    fingerprint = models.CharField(
        max_length=128, blank=True, help_text="The data dir's fingerprint at the last snapshot."
    )
    lock_token = models.CharField(max_length=64, blank=True)
    lock_kind = models.CharField(max_length=10, choices=LockKind.choices, blank=True)
    locked_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "backup repositories"

    def __str__(self) -> str:
        return f"backups of {self.sandbox}"

    def is_locked(self, now: datetime) -> bool:
        """Return True if a backup, restore or export holds the lease at ``now``."""
        return bool(self.lock_token) and self.locked_until is not None and now < self.locked_until


class Snapshot(models.Model):
    """One restic snapshot of a sandbox's data dir. The repository is the truth: rows are
    synced from ``restic snapshots`` after every backup and forget."""

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule"
        USER = "user"
        STAFF = "staff"
        OPS = "ops"
        SLEEP = "sleep"
        STOP = "stop"
        PRE_RESTORE = "pre-restore"
        MOVE = "move"  # before it moves to another host (sandboxes.relocation)

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="snapshots")
    restic_id = models.CharField(max_length=64)
    taken_at = models.DateTimeField(db_index=True)
    trigger = models.CharField(max_length=20, choices=Trigger.choices, default=Trigger.SCHEDULE)
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    files = models.PositiveIntegerField(default=0)
    size_bytes = models.BigIntegerField(default=0)
    added_bytes = models.BigIntegerField(default=0)
    pause_ms = models.PositiveIntegerField(
        null=True, blank=True, help_text="How long a running sandbox was frozen for it."
    )

    class Meta:
        ordering = ["-taken_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["sandbox", "restic_id"], name="one_snapshot_row_per_restic_id"
            )
        ]

    def __str__(self) -> str:
        return f"{self.short_id} of {self.sandbox} at {self.taken_at:%Y-%m-%d %H:%M}"

    @property
    def short_id(self) -> str:
        return self.restic_id[:8]


class Export(models.Model):
    """An archive of one snapshot that its owner may download until it expires."""

    class State(models.TextChoices):
        PENDING = "pending"
        READY = "ready"
        FAILED = "failed"

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="exports")
    snapshot = models.ForeignKey(
        Snapshot, null=True, blank=True, on_delete=models.SET_NULL, related_name="exports"
    )
    storage_name = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    error = models.TextField(blank=True)
    size_bytes = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"export of {self.sandbox} ({self.state})"

    def is_available(self, now: datetime) -> bool:
        """Return True if the archive is ready and not yet expired at ``now``."""
        return self.state == self.State.READY and (self.expires_at is None or now < self.expires_at)


class Suspension(models.Model):
    """A user staff suspended: their sandboxes stop and may not start, their AI credential is
    refused, and chat tells them why (``reason``). Unsuspending deletes the row; both are
    recorded as events on the user's sandboxes (sandboxes.accounts)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="suspension"
    )
    reason = models.CharField(max_length=500, blank=True)
    suspended_at = models.DateTimeField(default=timezone.now)
    suspended_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    def __str__(self) -> str:
        return f"suspension of {self.user}"


class AccountDeletion(models.Model):
    """A request to delete a user's account: who asked and when, and when its data goes.

    The account is deactivated at once (its sandboxes stop, its AI credential is refused); once
    ``purge_after`` has passed, the sandboxes' data, backups and secrets and the user row are
    removed and ``purged_at`` is set. The row outlives the user (``user`` becomes null), so who
    and when stay on record, with the email address the account had."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="deletion",
    )
    user_pk = models.PositiveIntegerField(help_text="The deleted user's id, kept after the purge.")
    email = models.CharField(max_length=254)
    requested_at = models.DateTimeField(default=timezone.now)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    by_owner = models.BooleanField(default=False, help_text="The user deleted their own account.")
    purge_after = models.DateTimeField(db_index=True)
    purge_started_at = models.DateTimeField(null=True, blank=True)
    purged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-requested_at"]

    def __str__(self) -> str:
        return f"deletion of {self.email}"
