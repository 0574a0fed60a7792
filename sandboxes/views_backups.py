"""The owner's backup pages: back up now, the list of snapshots, restore one, download the agent.

Contract:
- Every view gets the sandbox through :func:`sandboxes.access.get_sandbox_for_user`, and
  snapshots and exports only through that sandbox's own related managers
  (``access.get_snapshot_for_user``, ``access.get_export_for_user``), so another user's
  snapshot or export id is a 404 on every page and in the JSON, exactly like an id that does
  not exist.
- The work runs in Celery tasks (sandboxes.backups.tasks). A view checks that the request makes
  sense now (:func:`refusal`: nothing running or queued, not asked within the last minute),
  records it as a SandboxEvent naming the user (kind ``<what>-requested``), and queues the task.
  A request counts as queued until an event of its kind (``backup``, ``restore``, ``export``)
  follows it, or for :data:`QUEUE_PATIENCE` at most, so a lost task never blocks the buttons.
- Downloads: an export's archive is served to its owner by :func:`export_download`, streamed
  from the local export storage, or as a redirect to a short-lived presigned S3 URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.files.storage import FileSystemStorage
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    JsonResponse,
)
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from sandboxes.access import get_export_for_user, get_sandbox_for_user, get_snapshot_for_user
from sandboxes.events import record_event
from sandboxes.limits import limits_for
from sandboxes.models import BackupRepository, Export, Sandbox, SandboxEvent, Snapshot

COOLDOWN = timedelta(minutes=1)  # between two presses of one button by one user
QUEUE_PATIENCE = timedelta(minutes=10)  # a request with nothing after it for longer is lost
PRESIGNED_SECONDS = 300  # the life of one presigned download link (never past the expiry)
WORK = ("backup", "restore", "export")
SETTLED = frozenset(  # what a backup or restore may start from (as the actions' BACKUP_STATES)
    {
        Sandbox.State.RUNNING,
        Sandbox.State.SLEEPING,
        Sandbox.State.STOPPED,
        Sandbox.State.FAILED,
    }
)
BUSY_NOW = {
    "backup": "A backup of your agent is running.",
    "restore": "A restore of your agent is running.",
    "export": "Your download is being prepared.",
}
QUEUED = {
    "backup": "A backup of your agent is queued and starts shortly.",
    "restore": "A restore of your agent is queued and starts shortly.",
    "export": "Your download is queued and is prepared shortly.",
}


# -- the doors: a user's own snapshots and exports, nobody else's -------------------------------


# -- what may be asked for now ------------------------------------------------------------------


def running_work(sandbox: Sandbox, now: datetime) -> str | None:
    """Return the kind of work ("backup", "restore", "export") holding the sandbox's backup
    lease at ``now``, or None."""
    repo = BackupRepository.objects.filter(sandbox=sandbox).first()
    if repo is None or not repo.is_locked(now):
        return None
    return repo.lock_kind or "backup"


def queued_work(sandbox: Sandbox, what: str, now: datetime) -> SandboxEvent | None:
    """Return the latest request for ``what`` that no event of that kind has followed yet (and
    that is younger than QUEUE_PATIENCE), or None."""
    request = (
        sandbox.events.filter(kind=f"{what}-requested", created_at__gt=now - QUEUE_PATIENCE)
        .order_by("-id")
        .first()
    )
    if request is None or sandbox.events.filter(kind=what, id__gt=request.pk).exists():
        return None
    # An export's task makes its Export row first (it may fail before any event).
    if what == "export" and sandbox.exports.filter(created_at__gte=request.created_at).exists():
        return None
    return request


def refusal(sandbox: Sandbox, user: Any, what: str, now: datetime) -> str:
    """Return why ``user`` may not ask for ``what`` on ``sandbox`` now, as a sentence to show
    them; "" if they may."""
    running = running_work(sandbox, now)
    if running is not None:
        return f"{BUSY_NOW[running]} Please wait until it has finished."
    # A backup and a restore exclude each other; an export only excludes another export.
    for kind in (what,) if what == "export" else ("backup", "restore"):
        if queued_work(sandbox, kind, now) is not None:
            return f"{QUEUED[kind]} Please wait until it has finished."
    recent = sandbox.events.filter(
        kind=f"{what}-requested", actor_user=user, created_at__gt=now - COOLDOWN
    )
    if recent.exists():
        return "You asked for this less than a minute ago. Please wait a moment."
    if what != "export" and sandbox.state == Sandbox.State.PROVISIONING:
        return "Your agent has not started yet, so there is nothing to back up or restore."
    if what != "export" and sandbox.state not in SETTLED:
        verb = "restored" if what == "restore" else "backed up"
        return f"Your agent is {sandbox.state}: it can be {verb} once it has settled."
    if what == "export" and not sandbox.snapshots.exists():
        return "There is no backup to download yet: back up your agent first."
    return ""


# -- dashboard context --------------------------------------------------------------------------


TRIGGER_LABELS: dict[str, str] = {
    Snapshot.Trigger.SCHEDULE: "Scheduled",
    Snapshot.Trigger.USER: "You asked",
    Snapshot.Trigger.STAFF: "Hermit support",
    Snapshot.Trigger.OPS: "Hermit operations",
    Snapshot.Trigger.SLEEP: "Before sleeping",
    Snapshot.Trigger.STOP: "Before stopping",
    Snapshot.Trigger.PRE_RESTORE: "Before a restore",
}


@dataclass(frozen=True)
class SnapshotRow:
    """One line of the dashboard's snapshot list."""

    snapshot: Snapshot
    why: str


@dataclass(frozen=True)
class ExportView:
    """What the dashboard says about the latest export."""

    export: Export
    available: bool
    expired: bool
    interrupted: bool  # pending, but nothing prepares it any more (its worker died)


def backup_context(sandbox: Sandbox, user: Any, now: datetime | None = None) -> dict[str, Any]:
    """Return the dashboard's backup section: the snapshots, the latest export, and what is
    under way (``busy``: a sentence, or "")."""
    now = now or timezone.now()
    latest = sandbox.exports.select_related("snapshot").first()
    running = running_work(sandbox, now)
    queued = [w for w in WORK if queued_work(sandbox, w, now) is not None]
    busy = BUSY_NOW[running] if running else (QUEUED[queued[0]] if queued else "")
    export_pending = running == "export" or "export" in queued
    rows = [
        SnapshotRow(s, TRIGGER_LABELS.get(s.trigger, s.trigger)) for s in sandbox.snapshots.all()
    ]
    return {
        "backup_schedule": _every(limits_for(sandbox.owner).backup_interval),
        "snapshots": rows,
        "latest_export": _export_view(latest, now, export_pending) if latest else None,
        "backup_busy": busy,
        "restore_pending": running == "restore" or "restore" in queued,
        "export_pending": export_pending,
    }


def _every(interval: timedelta | None) -> str:
    """Return "every day", "every 6 hours", ...; "" for no schedule."""
    if not interval:
        return ""
    seconds = int(interval.total_seconds())
    for unit, size in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"every {unit}" if count == 1 else f"every {count} {unit}s"
    return f"every {seconds} seconds"


def _export_view(export: Export, now: datetime, pending: bool) -> ExportView:
    available = export.is_available(now)
    expired = export.state == Export.State.READY and not available
    interrupted = export.state == Export.State.PENDING and not pending
    return ExportView(export, available=available, expired=expired, interrupted=interrupted)


# -- views --------------------------------------------------------------------------------------


@login_required
@require_POST
def backup_now(request: HttpRequest) -> HttpResponse:
    """Queue a backup of the user's sandbox, unless :func:`refusal` says no."""
    from sandboxes.backups import tasks

    sandbox = get_sandbox_for_user(request.user)
    reason = refusal(sandbox, request.user, "backup", timezone.now())
    if reason:
        messages.warning(request, reason)
        return redirect("dashboard")
    _record_request(sandbox, request.user, "backup", "Backup requested")
    tasks.backup_sandbox.delay(sandbox.pk, Snapshot.Trigger.USER, request.user.pk)
    messages.success(request, "Backup queued. It appears in the list below once it is done.")
    return redirect("dashboard")


@login_required
def restore_confirm(request: HttpRequest, snapshot_id: int) -> HttpResponse:
    """GET: say what a restore of this snapshot does and ask to confirm. POST: queue it."""
    from sandboxes.backups import tasks

    snapshot = get_snapshot_for_user(request.user, snapshot_id)
    sandbox = snapshot.sandbox
    reason = refusal(sandbox, request.user, "restore", timezone.now())
    if request.method == "POST" and not reason:
        when = timezone.localtime(snapshot.taken_at).strftime("%Y-%m-%d %H:%M:%S UTC")
        _record_request(
            sandbox, request.user, "restore", f"Restore of the backup of {when} requested"
        )
        tasks.restore_sandbox.delay(sandbox.pk, snapshot.pk, request.user.pk)
        messages.success(request, "Restore queued. Follow its progress below.")
        return redirect("dashboard")
    context = {"sandbox": sandbox, "snapshot": snapshot, "refusal": reason}
    return render(request, "sandboxes/backups/restore_confirm.html", context)


@login_required
@require_POST
def export_request(request: HttpRequest) -> HttpResponse:
    """Queue an archive of the user's latest snapshot, unless :func:`refusal` says no."""
    from sandboxes.backups import tasks

    sandbox = get_sandbox_for_user(request.user)
    reason = refusal(sandbox, request.user, "export", timezone.now())
    if reason:
        messages.warning(request, reason)
        return redirect("dashboard")
    _record_request(sandbox, request.user, "export", "Download of the agent requested")
    tasks.export_snapshot.delay(sandbox.pk, None, request.user.pk)
    messages.success(request, "Preparing your download. A link appears below when it is ready.")
    return redirect("dashboard")


@login_required
@require_GET
def export_download(request: HttpRequest, export_id: int) -> HttpResponseBase:
    """Serve the archive of one of the user's own exports while it is available: the file
    itself from local storage, or a redirect to a presigned URL on S3. Expired (410) or not
    ready exports get a page that says so."""
    from sandboxes.backups.storage import export_storage

    export = get_export_for_user(request.user, export_id)
    now = timezone.now()
    storage = export_storage()
    stored = bool(export.storage_name) and storage.exists(export.storage_name)
    if not export.is_available(now) or not stored:
        return _export_unavailable(request, export, now)
    filename = _download_name(export)
    if isinstance(storage, FileSystemStorage):
        return FileResponse(
            storage.open(export.storage_name, "rb"), as_attachment=True, filename=filename
        )
    seconds = PRESIGNED_SECONDS
    if export.expires_at is not None:
        seconds = max(1, min(seconds, int((export.expires_at - now).total_seconds())))
    disposition = {"ResponseContentDisposition": f'attachment; filename="{filename}"'}
    url = storage.url(export.storage_name, parameters=disposition, expire=seconds)  # type: ignore[call-arg]
    return HttpResponseRedirect(url)


@login_required
@require_GET
def backups_json(request: HttpRequest) -> JsonResponse:
    """The user's own snapshots and exports, and what is under way, as JSON."""
    sandbox = get_sandbox_for_user(request.user)
    now = timezone.now()
    context = backup_context(sandbox, request.user, now)
    exports = sandbox.exports.select_related("snapshot")[:10]
    return JsonResponse(
        {
            "state": sandbox.state,
            "busy": context["backup_busy"],
            "snapshots": [_snapshot_json(row.snapshot) for row in context["snapshots"]],
            "exports": [_export_json(e, now) for e in exports],
        }
    )


@login_required
@require_GET
def backups_card(request: HttpRequest) -> HttpResponse:
    """The dashboard's backup section alone, for the dashboard's script to refresh it."""
    sandbox = get_sandbox_for_user(request.user)
    context = {"sandbox": sandbox, **backup_context(sandbox, request.user)}
    return render(request, "sandboxes/backups/_card.html", context)


# -- helpers ------------------------------------------------------------------------------------


def _record_request(sandbox: Sandbox, user: Any, what: str, message: str) -> None:
    record_event(
        sandbox,
        f"{what}-requested",
        message,
        actor=SandboxEvent.Actor.USER,
        actor_user=user,
    )


def _export_unavailable(request: HttpRequest, export: Export, now: datetime) -> HttpResponse:
    if export.state == Export.State.PENDING and running_work(export.sandbox, now) == "export":
        status, reason = 409, "This download is still being prepared. Try again in a moment."
    elif export.state == Export.State.PENDING:
        status, reason = 410, "This download was interrupted. Ask for a new one."
    elif export.state == Export.State.FAILED:
        status, reason = 410, f"This download could not be prepared: {export.error}"
    else:
        when = export.expires_at or now
        stamp = timezone.localtime(when).strftime("%Y-%m-%d %H:%M UTC")
        status, reason = 410, f"This download expired on {stamp}. Ask for a new one."
    context = {"export": export, "reason": reason}
    return render(request, "sandboxes/backups/export_unavailable.html", context, status=status)


def _download_name(export: Export) -> str:
    taken = export.snapshot.taken_at if export.snapshot else export.created_at
    suffix = export.storage_name.rsplit("/", 1)[-1].partition(".")[2] or "tar"
    return f"hermit-agent-{timezone.localtime(taken):%Y%m%d-%H%M%S}.{suffix}"


def _snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "id": snapshot.pk,
        "short_id": snapshot.short_id,
        "taken_at": snapshot.taken_at.isoformat(),
        "trigger": snapshot.trigger,
        "files": snapshot.files,
        "size_bytes": snapshot.size_bytes,
        "added_bytes": snapshot.added_bytes,
        "restore_url": reverse("backup-restore", args=[snapshot.pk]),
    }


def _export_json(export: Export, now: datetime) -> dict[str, Any]:
    available = export.is_available(now)
    return {
        "id": export.pk,
        "state": export.state,
        "snapshot_id": export.snapshot_id,
        "created_at": export.created_at.isoformat(),
        "expires_at": export.expires_at.isoformat() if export.expires_at else None,
        "expired": export.state == Export.State.READY and not available,
        "size_bytes": export.size_bytes,
        "error": export.error,
        "download_url": reverse("export-download", args=[export.pk]) if available else None,
    }
