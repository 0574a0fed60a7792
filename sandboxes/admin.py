"""Staff views: every sandbox, runtime image and event, with actions that are recorded.

Actions need a permission beyond viewing: start, stop and restart need
``sandboxes.operate_sandbox``; making a runtime image current needs ``change_runtimeimage``.
View-only staff neither see them nor can post them (Django checks ``allowed_permissions`` on both).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from sandboxes import runtime, tasks
from sandboxes.events import record_event
from sandboxes.models import RuntimeImage, Sandbox, SandboxEvent


class SandboxEventInline(admin.TabularInline[SandboxEvent, Sandbox]):
    model = SandboxEvent
    extra = 0
    can_delete = False
    fields = ("created_at", "actor", "actor_user", "kind", "message", "progress", "state")
    readonly_fields = fields
    ordering = ("-created_at",)
    max_num = 0


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
    list_display = ("__str__", "owner", "state", "runtime", "last_activity_at", "updated_at")
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
    )
    exclude = ("gateway_token", "device_private_key", "device_token")
    inlines = [SandboxEventInline]
    list_select_related = ("owner", "runtime")
    actions = ["start", "stop", "restart"]

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.operate_sandbox")

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
