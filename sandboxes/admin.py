"""Staff views: every sandbox, runtime image and event, with actions that are recorded.

A sandbox's page shows its state, owner, plan, host and runtime; its memory, CPU, processes
and last log lines read from the backend now by the privileged worker on the sandbox's host
(sandboxes.tasks_host.look_inside, around sandboxes.staff.look_inside: bounded in time,
secrets redacted; the page says so if the host does not answer), and its paired devices
(read and approved or revoked through that worker too); its last activity and snapshot, this
month's tokens and cost, and its events. The list shows, per sandbox, the latest staff request
and what has happened since.

Actions need a permission beyond viewing: start, stop, restart, sleep, wake and "Move to
runtime version…" need ``sandboxes.operate_sandbox``; "Back up now" needs
``sandboxes.backup_sandbox``; "Restore snapshot…" needs ``sandboxes.restore_sandbox``; making a
runtime image current needs ``change_runtimeimage``. View-only staff neither see them nor can
post them (Django checks ``allowed_permissions`` on both). Every action is recorded as a
SandboxEvent naming the staff member before its Celery task is queued; backups and restores
then record their own progress, and sleep, wake and moves record their result ("staff-result").

"Restore snapshot…" asks first, on a page of its own: for one sandbox, which of its snapshots;
for several, the latest of each, or the latest of each taken at or before a given time (sandboxes
with no such snapshot are left alone, and named).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.defaultfilters import filesizeformat
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

import sandboxes.admin_hosts  # noqa: F401 (registers the sandbox hosts' admin)
from sandboxes import hosts, runtime, staff, tasks, tasks_host
from sandboxes.admin_users import register_user_admins
from sandboxes.ai_keys import usage_line
from sandboxes.backends.base import ProcessInfo
from sandboxes.backups import tasks as backup_tasks
from sandboxes.events import record_event
from sandboxes.limits import limits_for
from sandboxes.models import BackupRepository, RuntimeImage, Sandbox, SandboxEvent, Snapshot
from sandboxes.openclaw import devices

EVENTS_DAYS = 7
INSIDE_WAIT = 2.0  # seconds the page waits for the host's worker beyond its own read deadline
BACKUP_KINDS = (
    "backup",
    "restore",
    "export",
    "backup-requested",
    "restore-requested",
    "export-requested",
)


class SandboxEventInline(admin.TabularInline[SandboxEvent, Sandbox]):
    """The events timeline of the last EVENTS_DAYS days (all of them: Sandbox events)."""

    model = SandboxEvent
    verbose_name_plural = f"events of the last {EVENTS_DAYS} days (older ones under Sandbox events)"
    extra = 0
    can_delete = False
    fields = ("created_at", "actor", "actor_user", "kind", "message", "progress", "state")
    readonly_fields = fields
    ordering = ("-created_at",)
    max_num = 0

    def get_queryset(self, request: HttpRequest) -> QuerySet[SandboxEvent]:
        since = timezone.now() - timedelta(days=EVENTS_DAYS)
        return super().get_queryset(request).filter(created_at__gte=since)


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


def _staff_request(
    request: HttpRequest, queryset: QuerySet[Sandbox], what: str, task: Any, *args: Any
) -> None:
    """Record the request on each sandbox under the staff member's name, then queue ``task``
    with the sandbox's pk (and ``args``: the staff member's pk for the tasks that record
    their own result)."""
    for sandbox in queryset:
        record_event(
            sandbox,
            "staff",
            f"Staff requested {what}",
            actor=SandboxEvent.Actor.STAFF,
            actor_user=request.user,
        )
        task.delay(sandbox.pk, *args)
    messages.info(request, f"Requested {what} for {queryset.count()} sandbox(es).")


class MoveForm(forms.Form):
    """Which runtime image to move sandboxes to (ready ones only)."""

    runtime = forms.ModelChoiceField(
        queryset=RuntimeImage.objects.filter(status=RuntimeImage.Status.READY),
        widget=forms.RadioSelect,
        empty_label=None,
        label="Runtime version",
    )


def _bytes(value: int | None) -> str:
    return "-" if value is None else filesizeformat(value)


def _look_inside(sandbox: Sandbox) -> staff.Inside:
    """What the worker on the sandbox's host reads inside it (tasks_host.look_inside, bounded
    there by staff.LOOK_TIMEOUT); the page waits INSIDE_WAIT s more for the queue, then says
    the host could not report."""
    if sandbox.state not in staff.UP or not sandbox.backend_state:  # nothing to ask the host
        return staff.Inside(problem=f"Not running ({sandbox.state}): nothing to measure.")
    token = tasks_host.new_token()
    tasks_host.look_inside.delay(sandbox.pk, token)
    reply = tasks_host.wait_reply(token, staff.LOOK_TIMEOUT + INSIDE_WAIT)
    if reply is None:
        waited = staff.LOOK_TIMEOUT + INSIDE_WAIT
        return staff.Inside(problem=f"The sandbox's host could not report within {waited:g} s.")
    processes = [ProcessInfo(**p) for p in reply.pop("processes", [])]
    return staff.Inside(**reply, processes=processes)


OVERVIEW = (
    "state",
    "owner_link",
    "plan",
    "host_label",
    "runtime_version",
    "error_message",
    "started_at",
    "last_activity_at",
    "last_snapshot",
    "usage_this_month",
)
INSIDE = ("resources", "process_list", "log_tail")
DEVICES = ("paired_devices",)


@admin.register(Sandbox)
class SandboxAdmin(admin.ModelAdmin[Sandbox]):
    list_display = (
        "__str__",
        "owner",
        "state",
        "host",
        "runtime",
        "last_activity_at",
        "last_backup",
        "staff_action",
        "updated_at",
    )
    list_filter = ("state", "host", "backend", "runtime")
    search_fields = ("owner__email", "owner__username", "name")
    readonly_fields = (
        *OVERVIEW,
        *INSIDE,
        *DEVICES,
        "backend_state",
        "created_at",
        "updated_at",
        "backup_status",
    )
    fieldsets = (
        (None, {"fields": OVERVIEW}),
        ("Now (read from the backend)", {"fields": INSIDE}),
        ("OpenClaw devices (read from the gateway)", {"fields": DEVICES}),
        ("Backups", {"fields": ("backup_status",)}),
        (
            "Details",
            {
                "classes": ("collapse",),
                "fields": (
                    "owner",
                    "name",
                    "backend",
                    "runtime",
                    "runtime_pinned",
                    "backend_state",
                    "crash_count",
                    "last_crash_at",
                    "restart_after",
                    "boot_queued_at",
                    "next_job_at",
                    "created_at",
                    "updated_at",
                ),
            },
        ),
    )
    exclude = ("gateway_token", "device_private_key", "device_token")
    raw_id_fields = ("owner",)
    inlines = [SnapshotInline, SandboxEventInline]
    list_select_related = ("owner", "host", "runtime", "backup_repo")
    actions = [
        "start",
        "stop",
        "restart",
        "sleep",
        "wake",
        "move_to_runtime",
        "back_up",
        "restore_snapshot",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Sandbox]:
        """Each row with its latest staff request and its latest event, for ``staff_action``."""
        events = SandboxEvent.objects.filter(sandbox=OuterRef("pk")).order_by("-created_at", "-id")
        requests = events.filter(actor=SandboxEvent.Actor.STAFF, kind="staff")
        return (
            super()
            .get_queryset(request)
            .annotate(
                staff_request=Subquery(requests.values("message")[:1]),
                staff_request_at=Subquery(requests.values("created_at")[:1]),
                latest_event=Subquery(events.values("message")[:1]),
                latest_event_at=Subquery(events.values("created_at")[:1]),
            )
        )

    @admin.display(description="latest staff action → since")
    def staff_action(self, obj: Sandbox) -> str:
        asked = getattr(obj, "staff_request", None)
        if not asked:
            return "-"
        asked_at: datetime = obj.staff_request_at  # type: ignore[attr-defined]
        latest, latest_at = obj.latest_event, obj.latest_event_at  # type: ignore[attr-defined]
        since = "queued" if latest_at <= asked_at else latest
        return f"{asked.removeprefix('Staff requested ')} ({_when(asked_at)}) → {since}"

    # -- the page -------------------------------------------------------------------------------

    def _inside(self, obj: Sandbox) -> staff.Inside:
        """Read the backend once per page (the three fields below share it)."""
        found = getattr(obj, "_hermit_inside", None)
        if found is None:
            found = _look_inside(obj)
            obj._hermit_inside = found  # type: ignore[attr-defined]
        return found

    @admin.display(description="owner")
    def owner_link(self, obj: Sandbox) -> str:
        if not obj.pk:
            return "-"
        url = reverse("admin:auth_user_change", args=[obj.owner_id])
        return format_html('<a href="{}">{}</a> ({})', url, obj.owner.email, obj.owner)

    @admin.display(description="paired devices")
    def paired_devices(self, obj: Sandbox) -> SafeString | str:
        """Pending requests with Approve, paired devices with Revoke (buttons posting the page's
        form to this sandbox's device URLs; shown to staff who may operate sandboxes)."""
        if not obj.pk:
            return "-"
        try:
            found = devices.ask_list(obj)
        except devices.DeviceError as exc:
            return str(exc)
        context = {
            "devices": found,
            "may_act": getattr(obj, "_hermit_may_operate", False),
            "approve_url": reverse("admin:sandboxes_sandbox_device", args=[obj.pk, "approve"]),
            "revoke_url": reverse("admin:sandboxes_sandbox_device", args=[obj.pk, "revoke"]),
        }
        return render_to_string("admin/sandboxes/sandbox/_devices.html", context)

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> Sandbox | None:
        """The sandbox, noting whether this staff member may act on its devices."""
        obj = super().get_object(request, object_id, from_field)
        if obj is not None:
            obj._hermit_may_operate = self.has_operate_permission(request)  # type: ignore[attr-defined]
        return obj

    def get_urls(self) -> list[URLPattern]:
        mine = [
            path(
                "<int:sandbox_id>/devices/<str:verb>/",
                self.admin_site.admin_view(self.device_action),
                name="sandboxes_sandbox_device",
            )
        ]
        return mine + super().get_urls()

    def device_action(self, request: HttpRequest, sandbox_id: int, verb: str) -> HttpResponse:
        """POST: approve a pending device (``request_id``) or revoke a paired one's token
        (``device_id``) through the gateway; record it under the staff member's name."""
        if request.method != "POST" or verb not in ("approve", "revoke"):
            return HttpResponseNotAllowed(["POST"])
        if not self.has_operate_permission(request):
            raise PermissionDenied
        sandbox = get_object_or_404(Sandbox, pk=sandbox_id)
        page = reverse("admin:sandboxes_sandbox_change", args=[sandbox.pk])
        target = request.POST.get("request_id" if verb == "approve" else "device_id", "")[:200]
        try:
            if verb == "approve":
                device = devices.ask_approve(sandbox, target)
                what = f"Staff approved device {device.device_id[:12]}… ({device.client})"
            else:
                devices.ask_revoke(sandbox, target)
                what = f"Staff revoked device {target[:12]}…"
        except devices.DeviceError as exc:
            messages.error(request, str(exc))
            return HttpResponseRedirect(page)
        record_event(
            sandbox,
            f"device-{verb}d",
            what,
            actor=SandboxEvent.Actor.STAFF,
            actor_user=request.user,
        )
        messages.success(request, what)
        return HttpResponseRedirect(page)

    @admin.display(description="plan")
    def plan(self, obj: Sandbox) -> str:
        return limits_for(obj.owner).plan_name if obj.pk else "-"

    @admin.display(description="host")
    def host_label(self, obj: Sandbox) -> str:
        """The sandbox host it is placed on (Sandbox.host; none recorded means this machine,
        as sandboxes.hosts.is_here has it), and its backend."""
        where = obj.host.name if obj.host is not None else hosts.local_name()
        return f"{where} ({obj.backend} backend)"

    @admin.display(description="runtime version")
    def runtime_version(self, obj: Sandbox) -> str:
        if obj.runtime is None:
            return "none yet (it starts on the current one)"
        pinned = " · pinned by staff" if obj.runtime_pinned else ""
        current = " (current)" if obj.runtime.is_current else " (not current)"
        return f"{obj.runtime}{current}{pinned}"

    @admin.display(description="last snapshot")
    def last_snapshot(self, obj: Sandbox) -> str:
        latest = obj.snapshots.first() if obj.pk else None
        return _snapshot_label(latest) if latest is not None else "none"

    @admin.display(description="this month's model use")
    def usage_this_month(self, obj: Sandbox) -> str:
        return usage_line(obj.owner) if obj.pk else "-"

    @admin.display(description="memory, CPU, disk")
    def resources(self, obj: Sandbox) -> str:
        inside = self._inside(obj)
        if inside.memory_bytes is None:
            return inside.problem
        limit = inside.memory_limit_bytes or limits_for(obj.owner).memory_mb * 2**20
        return format_html(
            '<span id="sandbox-resources">Memory {} of {} · CPU {}% now ({} s in all) · '
            "disk {}</span>",
            _bytes(inside.memory_bytes),
            _bytes(limit),
            inside.cpu_percent,
            inside.cpu_seconds,
            _bytes(inside.disk_bytes),
        )

    @admin.display(description="processes")
    def process_list(self, obj: Sandbox) -> SafeString | str:
        inside = self._inside(obj)
        if not inside.processes:
            return inside.problem or "none"
        return render_to_string(
            "admin/sandboxes/sandbox/_processes.html", {"processes": inside.processes}
        )

    @admin.display(description=f"last {staff.LOG_LINES} log lines (secrets redacted)")
    def log_tail(self, obj: Sandbox) -> str:
        inside = self._inside(obj)
        if inside.problem:
            return inside.problem
        return format_html(
            '<pre id="sandbox-log" style="{}">{}</pre>',
            "max-height:28em;overflow:auto;white-space:pre-wrap",
            inside.log or "(empty)",
        )

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.operate_sandbox")

    def has_backup_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.backup_sandbox")

    def has_restore_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.restore_sandbox")

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        """Sandboxes go with their owner's account (the user admin's "Delete account…")."""
        return False

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

    @admin.action(description="Put selected sandboxes to sleep", permissions=["operate"])
    def sleep(self, request: HttpRequest, queryset: QuerySet[Sandbox]) -> None:
        _staff_request(request, queryset, "sleep", tasks.sleep_sandbox, request.user.pk)

    @admin.action(description="Wake selected sandboxes", permissions=["operate"])
    def wake(self, request: HttpRequest, queryset: QuerySet[Sandbox]) -> None:
        _staff_request(request, queryset, "wake", tasks.wake_sandbox, request.user.pk)

    @admin.action(description="Move to runtime version…", permissions=["operate"])
    def move_to_runtime(
        self, request: HttpRequest, queryset: QuerySet[Sandbox]
    ) -> TemplateResponse | None:
        """Ask which runtime image; once answered, queue one move per sandbox."""
        form = MoveForm(request.POST if "apply" in request.POST else None)
        if form.is_bound and form.is_valid():
            image = form.cleaned_data["runtime"]
            what = f"a move to {image}"
            _staff_request(request, queryset, what, tasks.move_sandbox, image.pk, request.user.pk)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Move to runtime version",
            "opts": self.model._meta,
            "sandboxes": list(queryset.select_related("owner", "runtime")),
            "form": form,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/sandboxes/sandbox/move_runtime.html", context)


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


register_user_admins(admin.site)
