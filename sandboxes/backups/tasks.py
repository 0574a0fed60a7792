"""Celery tasks for backups: thin, idempotent wrappers around sandboxes.backups.actions.

Each takes primary keys, re-reads the rows, and does nothing when there is nothing to do (the
sandbox is gone, a scheduled backup is no longer due, a sleep's backup finds the agent running
again). A task that finds the lease taken (BackupBusy) returns: whoever holds it is doing the
same work. Failures are recorded as SandboxEvents by the actions and logged here.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from celery import shared_task
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Q
from django.utils import timezone

from portal.celery import HostTask
from sandboxes import alerts
from sandboxes.backups import actions, restic, storage
from sandboxes.events import record_event
from sandboxes.limits import limits_for
from sandboxes.models import BackupRepository, Sandbox, Snapshot
from sandboxes.pool import POOL_USERNAME

log = logging.getLogger(__name__)
State = Sandbox.State
Trigger = Snapshot.Trigger

# The states a scheduled backup looks at (a starting, stopping or restoring one waits).
SCHEDULED_STATES = (State.RUNNING, State.DOZING, State.SLEEPING, State.STOPPED)
# A backup queued by a sleep or a stop is moot once the agent runs again: the schedule has it.
STOPPED_TRIGGERS: dict[str, str] = {Trigger.SLEEP: State.SLEEPING, Trigger.STOP: State.STOPPED}


def _sandbox(sandbox_id: int) -> Sandbox | None:
    return Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first()


def _user(user_id: int | None) -> Any:
    if user_id is None:
        return None
    return get_user_model().objects.filter(pk=user_id).first()


def _refused(sandbox: Sandbox, kind: str, reason: str, user: Any) -> None:
    """Tell a person who asked for work that did not start why (the dashboard stops showing
    it as queued once an event of its kind follows the request)."""
    if user is None:
        return
    actor = actions.Actor.USER if user.pk == sandbox.owner_id else actions.Actor.STAFF
    record_event(sandbox, kind, f"Not started: {reason}", actor=actor, actor_user=user)


class RequestedTask(HostTask):
    """A task asked for by a person (sent on to its sandbox's host like every task): every
    message carries ``requested_at`` (when it was sent, aware UTC, ISO 8601), so the task can
    refuse a request that has grown stale.

    Tasks are acknowledged late (a killed worker's task is run again), and Redis hands an
    unacknowledged message out again only after its visibility timeout (an hour): a restore
    killed halfway would otherwise run again an hour later and revert the agent to an old
    snapshot under its user's feet (reconcile has already finished or undone the first).
    """

    def apply_async(
        self, args: Any = None, kwargs: dict[str, Any] | None = None, *rest: Any, **options: Any
    ) -> Any:
        kwargs = dict(kwargs or {})
        kwargs.setdefault("requested_at", timezone.now().isoformat())
        return super().apply_async(args, kwargs, *rest, **options)


_STALE = "it was asked for too long ago (the workers were busy or restarted); ask again."


def _stale(requested_at: str | None) -> bool:
    """Return True if a request made at ``requested_at`` is older than the setting allows."""
    if not requested_at:
        return False
    try:
        asked = datetime.fromisoformat(requested_at)
    except ValueError:
        return True
    if asked.tzinfo is None:
        return True
    return timezone.now() - asked > timedelta(seconds=settings.HERMIT_BACKUP_REQUEST_MAX_AGE)


def _failed(sandbox: Sandbox, kind: str, reason: str, user: Any) -> None:
    """Record a failure the actions could not (it happened before their work began), naming
    whoever asked, or the system for a scheduled run."""
    actor = actions.Actor.SYSTEM
    if user is not None:
        actor = actions.Actor.USER if user.pk == sandbox.owner_id else actions.Actor.STAFF
    record_event(sandbox, kind, f"Failed: {reason}", actor=actor, actor_user=user)


def is_due(sandbox: Sandbox, now: datetime) -> bool:
    """Return True if the sandbox's plan schedules backups and its interval has passed since
    the last attempt (a backup, a skip because nothing changed, or a failure)."""
    interval = limits_for(sandbox.owner).backup_interval
    if interval is None or sandbox.state not in SCHEDULED_STATES:
        return False
    row = BackupRepository.objects.filter(sandbox=sandbox).first()
    last = row.last_attempt_at if row is not None else None
    return last is None or now - last >= interval


@shared_task(acks_late=True)
def backup_sandbox(sandbox_id: int, trigger: str, actor_user_id: int | None = None) -> str:
    """Back up one sandbox; return ``done``, ``unchanged``, ``busy``, ``failed`` or
    ``skipped`` (gone, not due, or running again after the sleep that queued it)."""
    sandbox = _sandbox(sandbox_id)
    if sandbox is None:
        return "skipped"
    if trigger == Trigger.SCHEDULE and not is_due(sandbox, timezone.now()):
        return "skipped"
    wanted = STOPPED_TRIGGERS.get(trigger)
    if wanted is not None and sandbox.state != wanted:
        return "skipped"
    user = _user(actor_user_id)
    try:
        snapshot = actions.backup_sandbox(sandbox, trigger=trigger, actor_user=user)
    except actions.BackupBusy as exc:
        _refused(sandbox, "backup", str(exc), user)
        return "busy"
    except actions.BackupFailed as exc:  # recorded as an event by the action
        log.warning("backup of sandbox %s failed: %s", sandbox_id, exc)
        return "failed"
    except storage.StorageError as exc:  # the bucket is unreachable or misconfigured
        log.warning("backup of sandbox %s failed: %s", sandbox_id, exc)
        _failed(sandbox, "backup", str(exc), user)
        alerts.backup_failed(sandbox, str(exc))
        return "failed"
    return "done" if snapshot is not None else "unchanged"


@shared_task(base=RequestedTask, acks_late=True)
def restore_sandbox(
    sandbox_id: int,
    snapshot_id: int | None = None,
    actor_user_id: int | None = None,
    requested_at: str | None = None,
) -> str:
    """Restore one sandbox from a snapshot (a Snapshot pk; default its latest). A restore
    is asked for by a person: user if the owner asked, staff otherwise. Refused (``stale``)
    if asked for longer than HERMIT_BACKUP_REQUEST_MAX_AGE ago (see RequestedTask)."""
    sandbox = _sandbox(sandbox_id)
    if sandbox is None:
        return "skipped"
    snapshot = None
    user = _user(actor_user_id)
    if _stale(requested_at):
        _refused(sandbox, "restore", _STALE, user)
        return "stale"
    if snapshot_id is not None:
        snapshot = Snapshot.objects.filter(pk=snapshot_id, sandbox=sandbox).first()
        if snapshot is None:  # forgotten by retention meanwhile, or not this sandbox's
            _refused(sandbox, "restore", "that snapshot is no longer kept.", user)
            return "skipped"
    actor = actions.Actor.SYSTEM
    if user is not None:
        actor = actions.Actor.USER if user.pk == sandbox.owner_id else actions.Actor.STAFF
    try:
        actions.restore_sandbox(sandbox, snapshot, actor=actor, actor_user=user)
    except actions.BackupBusy as exc:
        _refused(sandbox, "restore", str(exc), user)
        return "busy"
    except actions.BackupFailed as exc:
        log.warning("restore of sandbox %s failed: %s", sandbox_id, exc)
        return "failed"
    except storage.StorageError as exc:
        log.warning("restore of sandbox %s failed: %s", sandbox_id, exc)
        _failed(sandbox, "restore", str(exc), user)
        return "failed"
    return "done"


@shared_task(base=RequestedTask, acks_late=True)
def export_snapshot(
    sandbox_id: int,
    snapshot_id: int | None = None,
    actor_user_id: int | None = None,
    requested_at: str | None = None,
) -> int | None:
    """Pack a snapshot for download; return the Export's pk (None if nothing was made, or
    if asked for longer than HERMIT_BACKUP_REQUEST_MAX_AGE ago)."""
    sandbox = _sandbox(sandbox_id)
    if sandbox is None:
        return None
    if _stale(requested_at):
        _refused(sandbox, "export", _STALE, _user(actor_user_id))
        return None
    snapshot = None
    if snapshot_id is not None:
        snapshot = Snapshot.objects.filter(pk=snapshot_id, sandbox=sandbox).first()
        if snapshot is None:
            return None
    user = _user(actor_user_id)
    try:
        export = actions.export_snapshot(sandbox, snapshot, actor_user=user)
    except (actions.BackupBusy, actions.BackupFailed) as exc:
        log.warning("export of sandbox %s failed: %s", sandbox_id, exc)
        return None
    except storage.StorageError as exc:
        log.warning("export of sandbox %s failed: %s", sandbox_id, exc)
        _failed(sandbox, "export", str(exc), user)
        return None
    return export.pk


def due_sandboxes(now: datetime) -> list[Sandbox]:
    """Return the sandboxes whose scheduled backup is due at ``now``."""
    candidates = (
        Sandbox.objects.select_related("owner")
        .filter(state__in=SCHEDULED_STATES)
        .exclude(owner__username=POOL_USERNAME)  # warm-pool gateways hold no one's data
        # No row yet, a row whose first attempt never got as far as recording itself (the
        # storage or ``restic init`` failed while the lease was being set up), or an old one.
        .filter(
            Q(backup_repo__isnull=True)
            | Q(backup_repo__last_attempt_at__isnull=True)
            | Q(backup_repo__last_attempt_at__lt=now)
        )
        .order_by("pk")
    )
    return [
        sandbox
        for sandbox in candidates
        if is_due(sandbox, now) and actions.has_data(sandbox)  # a missing dir: nothing to save
    ]


@shared_task(acks_late=True)
def backup_due_sandboxes() -> int:
    """Beat: queue a backup of every sandbox whose plan's interval has passed; return how many.

    Each queued task checks again that it is due, so a scan that runs while earlier ones are
    still queued adds no second backup. Expired exports are deleted on the way.
    """
    now = timezone.now()
    actions.delete_expired_exports(now)
    due = due_sandboxes(now)
    for sandbox in due:
        backup_sandbox.delay(sandbox.pk, Trigger.SCHEDULE)
    return len(due)


@shared_task(acks_late=True)
def purge_backups(location: str) -> None:
    """Delete a deleted sandbox's repository. Idempotent."""
    actions.purge_backups(location)


CHECK_KIND = "backup-check"  # the SandboxEvent kind
CHECK_LEASE = "check"  # the lease's kind while checking (a check never touches the data dir)


@shared_task(acks_late=True)
def check_backups() -> int:
    """Beat (every HERMIT_BACKUP_CHECK_INTERVAL): queue a check of every initialized backup
    repository; return how many."""
    ids = list(
        BackupRepository.objects.filter(initialized_at__isnull=False)
        .order_by("sandbox_id")
        .values_list("sandbox_id", flat=True)
    )
    for sandbox_id in ids:
        check_backup.delay(sandbox_id)
    return len(ids)


@shared_task(acks_late=True)
def check_backup(sandbox_id: int) -> str:
    """Check one sandbox's repository under its lease (restic check, reading a random
    HERMIT_BACKUP_CHECK_SUBSET of its data) and record the result as a ``backup-check``
    event; return ``ok``, ``damaged``, ``failed``, ``busy`` (a backup, restore or export holds
    the lease: the next check will do) or ``skipped`` (no sandbox or no repository)."""
    sandbox = _sandbox(sandbox_id)
    if (
        sandbox is None
        or not BackupRepository.objects.filter(
            sandbox=sandbox, initialized_at__isnull=False
        ).exists()
    ):
        return "skipped"
    subset = str(settings.HERMIT_BACKUP_CHECK_SUBSET or "").strip() or None
    read = f", reading {subset} of its data" if subset else ""
    started = time.monotonic()
    try:
        with actions.leased(sandbox, CHECK_LEASE) as (_lease, repo):
            try:
                restic.check(repo, read_data_subset=subset)
            except restic.ResticError as exc:
                error: restic.ResticError | None = exc
            else:
                error = None
    except actions.BackupBusy:
        return "busy"
    except (actions.BackupFailed, storage.StorageError) as exc:
        log.warning("the backup repository of sandbox %s could not be checked: %s", sandbox_id, exc)
        record_event(sandbox, CHECK_KIND, f"The backup repository could not be checked: {exc}")
        return "failed"
    seconds = time.monotonic() - started
    if error is None:
        record_event(
            sandbox, CHECK_KIND, f"Backup repository checked{read}: no damage ({seconds:.1f} s)"
        )
        return "ok"
    if error.corrupt:
        log.warning("the backup repository of sandbox %s is damaged: %s", sandbox_id, error)
        record_event(sandbox, CHECK_KIND, f"Backup repository check{read} found damage: {error}")
        return "damaged"
    log.warning("the backup repository of sandbox %s could not be checked: %s", sandbox_id, error)
    record_event(sandbox, CHECK_KIND, f"The backup repository could not be checked: {error}")
    return "failed"
