"""Staff views: every sandbox, runtime image and event, with actions that are recorded.

Actions need a permission beyond viewing: start, stop and restart need
``sandboxes.operate_sandbox``; "Back up now" needs ``sandboxes.backup_sandbox``; "Restore
snapshot…" needs ``sandboxes.restore_sandbox``; making a runtime image current needs
``change_runtimeimage``. View-only staff neither see them nor can post them (Django checks
``allowed_permissions`` on both). Every action is recorded as a SandboxEvent naming the staff
member before its Celery task is queued; backups and restores then record their own progress.

"Restore snapshot…" asks first, on a page of its own: for one sandbox, which of its snapshots;
for several, the latest of each, or the latest of each taken at or before a given time (sandboxes
with no such snapshot are left alone, and named).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html

from sandboxes import runtime, tasks
from sandboxes.backups import tasks as backup_tasks
from sandboxes.events import record_event
from sandboxes.models import BackupRepository, RuntimeImage, Sandbox, SandboxEvent, Snapshot

BACKUP_KINDS = (
    "backup",
    "restore",
    "export",
    "backup-requested",
    "restore-requested",
    "export-requested",
)


class SandboxEventInline(admin.TabularInline[SandboxEvent, Sandbox]):
    model = SandboxEvent
    extra = 0
    can_delete = False
    fields = ("created_at", "actor", "actor_user", "kind", "message", "progress", "state")
    readonly_fields = fields
    ordering = ("-created_at",)
    max_num = 0


class SnapshotInline(admin.TabularInline[Snapshot, Sandbox]):
    """The sandbox's snapshots, newest first (rows synced from its restic repository)."""

    model = Snapshot
    extra = 0
    can_delete = False
    fields = ("taken_at", "short_id", "trigger", "actor_user", "files", "size", "added", "pause_ms")
    readonly_fields = fields
    ordering = ("-taken_at",)
    max_num = 0

    @admin.display(description="size")
    def size(self, obj: Snapshot) -> str:
        return filesizeformat(obj.size_bytes)

    @admin.display(description="added to the repository")
    def added(self, obj: Snapshot) -> str:
        return filesizeformat(obj.added_bytes)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M:%S} UTC"


def _snapshot_label(snapshot: Snapshot) -> str:
    size = filesizeformat(snapshot.size_bytes)
    return f"{_when(snapshot.taken_at)} · {snapshot.trigger} · {size} · {snapshot.short_id}"


class SnapshotChoiceField(forms.ModelChoiceField[Snapshot]):
    def label_from_instance(self, obj: Any) -> str:
        return _snapshot_label(obj)


class RestoreOneForm(forms.Form):
    """Which snapshot of one sandbox to restore (only that sandbox's are choices)."""

    snapshot = SnapshotChoiceField(
        queryset=Snapshot.objects.none(), widget=forms.RadioSelect, empty_label=None
    )

    def __init__(self, sandbox: Sandbox, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["snapshot"]
        assert isinstance(field, SnapshotChoiceField)
        field.queryset = sandbox.snapshots.all()
        latest = sandbox.snapshots.first()
        if latest is not None:
            field.initial = latest.pk

    def chosen(self, sandboxes: list[Sandbox]) -> dict[int, Snapshot | None]:
        return {sandboxes[0].pk: self.cleaned_data["snapshot"]}


class RestoreManyForm(forms.Form):
    """Which snapshot of each of several sandboxes to restore: the latest, or the latest taken
    at or before a time."""

    which = forms.ChoiceField(
        choices=[
            ("latest", "The latest snapshot of each"),
            ("at", "The latest snapshot of each taken at or before:"),
        ],
        widget=forms.RadioSelect,
        initial="latest",
    )
    at = forms.DateTimeField(
        required=False,
        label="At or before (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": 1}),
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("which") == "at" and not data.get("at"):
            self.add_error("at", "Give the date and time.")
        return data

    def chosen(self, sandboxes: list[Sandbox]) -> dict[int, Snapshot | None]:
        at = self.cleaned_data["at"] if self.cleaned_data["which"] == "at" else None
        return {s.pk: _latest_snapshot(s, at) for s in sandboxes}


def _latest_snapshot(sandbox: Sandbox, at: datetime | None) -> Snapshot | None:
    snapshots = sandbox.snapshots.all()
    if at is not None:
        snapshots = snapshots.filter(taken_at__lte=at)
    return snapshots.first()


def _staff_request(request: HttpRequest, queryset: QuerySet[Sandbox], what: str, task: Any) -> None:
    for sandbox in queryset:
        record_event(
            sandbox,
            "staff",
            f"Staff requested {what}",
            actor=SandboxEvent.Actor.STAFF,
            actor_user=request.user,
        )
        task.delay(sandbox.pk)
    messages.info(request, f"Requested {what} for {queryset.count()} sandbox(es).")


@admin.register(Sandbox)
class SandboxAdmin(admin.ModelAdmin[Sandbox]):
    list_display = (
        "__str__",
        "owner",
        "state",
        "runtime",
        "last_activity_at",
        "last_backup",
        "updated_at",
    )
    list_filter = ("state", "backend", "runtime")
    search_fields = ("owner__email", "owner__username", "name")
    readonly_fields = (
        "state",
        "backend_state",
        "error_message",
        "started_at",
        "created_at",
        "updated_at",
        "last_activity_at",
        "backup_status",
    )
    exclude = ("gateway_token", "device_private_key", "device_token")
    inlines = [SnapshotInline, SandboxEventInline]
    list_select_related = ("owner", "runtime", "backup_repo")
    actions = ["start", "stop", "restart", "back_up", "restore_snapshot"]

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.operate_sandbox")

    def has_backup_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.backup_sandbox")

    def has_restore_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.restore_sandbox")

    @admin.display(description="last backup")
    def last_backup(self, obj: Sandbox) -> str:
        repo = _repo_of(obj)
        return _when(repo.last_backup_at if repo else None)

    @admin.display(description="backups")
    def backup_status(self, obj: Sandbox) -> str:
        """The repository, its lease, and the latest backup, restore or export step."""
        repo = _repo_of(obj)
        now = timezone.now()
        lease = "free"
        if repo is not None and repo.is_locked(now):
            lease = f"held by a {repo.lock_kind} until {_when(repo.locked_until)}"
        event = obj.events.filter(kind__in=BACKUP_KINDS).select_related("actor_user").first()
        progress = "no backup, restore or export yet"
        if event is not None:
            who = event.actor_user or event.actor
            progress = format_html(
                '<progress max="100" value="{}"></progress> {}% · {} · {} ({}, {})',
                event.progress or 0,
                event.progress if event.progress is not None else "-",
                event.message,
                _when(event.created_at),
                who,
                event.kind,
            )
        return format_html(
            "Last backup: {}<br>Repository: {}<br>Lease: {}<br>Latest: {}",
            _when(repo.last_backup_at if repo else None),
            (repo.location or "not created yet") if repo else "not created yet",
            lease,
            progress,
        )

    @admin.action(description="Back up now", permissions=["backup"])
    def back_up(self, request: HttpRequest, queryset: QuerySet[Sandbox]) -> None:
        for sandbox in queryset:
            record_event(
                sandbox,
                "backup-requested",
                "Staff requested a backup",
                actor=SandboxEvent.Actor.STAFF,
                actor_user=request.user,
            )
            backup_tasks.backup_sandbox.delay(sandbox.pk, Snapshot.Trigger.STAFF, request.user.pk)
        messages.info(request, f"Requested a backup of {queryset.count()} sandbox(es).")

    @admin.action(description="Restore snapshot…", permissions=["restore"])
    def restore_snapshot(
        self, request: HttpRequest, queryset: QuerySet[Sandbox]
    ) -> TemplateResponse | None:
        """Ask which snapshot(s); once answered, queue one restore per sandbox."""
        sandboxes = list(queryset.select_related("owner"))
        data = request.POST if "apply" in request.POST else None
        form: RestoreOneForm | RestoreManyForm = (
            RestoreOneForm(sandboxes[0], data) if len(sandboxes) == 1 else RestoreManyForm(data)
        )
        if form.is_bound and form.is_valid():
            self._queue_restores(request, sandboxes, form.chosen(sandboxes))
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Restore snapshot",
            "opts": self.model._meta,
            "sandboxes": [(s, s.snapshots.first(), s.snapshots.count()) for s in sandboxes],
            "form": form,
            "one": len(sandboxes) == 1,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/sandboxes/sandbox/restore_snapshot.html", context)

    def _queue_restores(
        self, request: HttpRequest, sandboxes: list[Sandbox], chosen: dict[int, Snapshot | None]
    ) -> None:
        skipped = []
        for sandbox in sandboxes:
            snapshot = chosen.get(sandbox.pk)
            if snapshot is None:
                skipped.append(str(sandbox))
                continue
            record_event(
                sandbox,
                "restore-requested",
                f"Staff requested a restore of snapshot {snapshot.short_id} "
                f"of {_when(snapshot.taken_at)}",
                actor=SandboxEvent.Actor.STAFF,
                actor_user=request.user,
            )
            backup_tasks.restore_sandbox.delay(sandbox.pk, snapshot.pk, request.user.pk)
        queued = len(sandboxes) - len(skipped)
        messages.info(request, f"Requested a restore of {queued} sandbox(es).")
        if skipped:
            messages.warning(
                request, f"No snapshot to restore, left alone: {', '.join(sorted(skipped))}."
            )

    @admin.action(description="Start selected sandboxes", permissions=["operate"])
    def start(self, request: HttpRequest, queryset: QuerySet[Sandbox]) -> None:
        _staff_request(request, queryset, "start", tasks.start_sandbox)

    @admin.action(description="Stop selected sandboxes", permissions=["operate"])
    def stop(self, request: HttpRequest, queryset: QuerySet[Sandbox]) -> None:
        _staff_request(request, queryset, "stop", tasks.stop_sandbox)

    @admin.action(
        description="Restart selected sandboxes (moves them to the current runtime)",
        permissions=["operate"],
    )
    def restart(self, request: HttpRequest, queryset: QuerySet[Sandbox]) -> None:
        _staff_request(request, queryset, "restart", tasks.restart_sandbox)


def _repo_of(sandbox: Sandbox) -> BackupRepository | None:
    try:
        return sandbox.backup_repo
    except BackupRepository.DoesNotExist:
        return None


@admin.register(SandboxEvent)
class SandboxEventAdmin(admin.ModelAdmin[SandboxEvent]):
    list_display = ("created_at", "sandbox", "actor", "actor_user", "kind", "message", "progress")
    list_filter = ("actor", "kind", "state")
    search_fields = ("message", "sandbox__owner__email")
    date_hierarchy = "created_at"
    list_select_related = ("sandbox__owner", "actor_user")

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # an audit log: read-only

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(RuntimeImage)
class RuntimeImageAdmin(admin.ModelAdmin[RuntimeImage]):
    list_display = (
        "openclaw_version",
        "node_version",
        "status",
        "is_current",
        "path",
        "created_at",
    )
    list_filter = ("status", "is_current")
    search_fields = ("openclaw_version", "path")
    actions = ["make_current"]

    @admin.action(
        description="Make current (upgrade or roll back; sandboxes move on next start)",
        permissions=["change"],
    )
    def make_current(self, request: HttpRequest, queryset: QuerySet[RuntimeImage]) -> None:
        if queryset.count() != 1:
            messages.error(request, "Choose exactly one runtime image.")
            return
        try:
            runtime.make_current(queryset.get())
        except ValueError as exc:
            messages.error(request, str(exc))
            return
        messages.success(request, "Runtime image is now current; sandboxes move on next start.")
