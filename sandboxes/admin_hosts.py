"""The sandbox hosts in the admin: read-mostly.

Staff see each host's state, how long ago its worker last heartbeated, how many sandboxes are
placed on it and awake, and its free RAM. Hosts register themselves (their worker's first
heartbeat), so nothing is added or deleted here; the one change is drain / undrain, as
``manage.py hosts`` does, for staff who may change hosts.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from sandboxes import hosts, tasks
from sandboxes.models import SandboxHost


def heartbeat_age(host: SandboxHost) -> str:
    """``12 s ago``, ``3 min ago``, or ``never``."""
    age = host.heartbeat_age(timezone.now())
    if age is None:
        return "never"
    seconds = int(age.total_seconds())
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def free_ram(host: SandboxHost) -> str:
    if host.free_ram_mb is None:
        return "unknown"
    total = f" of {host.capacity_ram_mb} MB" if host.capacity_ram_mb else " MB"
    return f"{host.free_ram_mb}{total}"


@admin.register(SandboxHost)
class SandboxHostAdmin(admin.ModelAdmin[SandboxHost]):
    list_display = (
        "name",
        "address",
        "state",
        "heartbeat",
        "placed",
        "awake_sandboxes",
        "free_memory",
        "capacity_sandboxes",
    )
    list_filter = ("state",)
    search_fields = ("name", "address")
    fields = (
        "name",
        "address",
        "state",
        "state_changed_at",
        "last_heartbeat",
        "free_ram_mb",
        "capacity_ram_mb",
        "awake_sandboxes",
        "capacity_sandboxes",
        "created_at",
    )
    readonly_fields = fields
    actions = ("drain", "undrain")

    def get_queryset(self, request: HttpRequest) -> QuerySet[SandboxHost]:
        return super().get_queryset(request).annotate(placed_count=Count("sandboxes"))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    @admin.display(description="last heartbeat", ordering="last_heartbeat")
    def heartbeat(self, obj: SandboxHost) -> str:
        return heartbeat_age(obj)

    @admin.display(description="sandboxes", ordering="placed_count")
    def placed(self, obj: SandboxHost) -> int:
        return int(getattr(obj, "placed_count", 0))

    @admin.display(description="free RAM", ordering="free_ram_mb")
    def free_memory(self, obj: SandboxHost) -> str:
        return free_ram(obj)

    @admin.action(description="Drain: place nothing new, move its sandboxes away")
    def drain(self, request: HttpRequest, queryset: QuerySet[SandboxHost]) -> None:
        for host in queryset:
            hosts.set_state(host.name, SandboxHost.State.DRAINING)
            queued = tasks.queue_moves(host)
            messages.success(request, f"{host.name} drains; {queued} idle sandboxes move now.")

    @admin.action(description="Undrain: take new sandboxes again")
    def undrain(self, request: HttpRequest, queryset: QuerySet[SandboxHost]) -> None:
        for host in queryset:
            hosts.set_state(host.name, SandboxHost.State.ACTIVE)
            messages.success(request, f"{host.name} is active again.")
