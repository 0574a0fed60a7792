"""Telegram links and their updates in the admin: what staff need to answer "my bot is silent".

Read-only. A link shows its bot, its agent, how many Telegram accounts are paired and how many
updates wait; its secrets (token, webhook secret, hook token) never reach a page
(portal.admin_site leaves encrypted fields out). An update shows when it came and went, its
attempts and last error, never what the user wrote. Users link and unlink their bots on the
Channels page; staff who may change links can unlink one here (the same action: its webhook is
removed and the agent's config updated) or queue the delivery of what waits.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest

from doorbell import actions
from doorbell.models import TelegramLink, TelegramUpdate


@admin.register(TelegramLink)
class TelegramLinkAdmin(admin.ModelAdmin[TelegramLink]):
    list_display = ("bot", "sandbox", "owner", "paired", "waiting", "webhook_set_at", "created_at")
    search_fields = ("bot_username", "sandbox__owner__email", "=bot_id")
    list_select_related = ("sandbox__owner",)
    fields = (
        "bot_username",
        "bot_id",
        "sandbox",
        "paired",
        "waiting",
        "webhook_id",
        "webhook_set_at",
        "created_at",
    )
    readonly_fields = fields
    actions = ("deliver_now", "unlink")

    def get_queryset(self, request: HttpRequest) -> QuerySet[TelegramLink]:
        return (
            super()
            .get_queryset(request)
            .annotate(waiting_count=Count("updates", filter=Q(updates__delivered_at=None)))
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # unlinking must remove the webhook too: the action below

    @admin.display(description="bot", ordering="bot_username")
    def bot(self, obj: TelegramLink) -> str:
        return f"@{obj.bot_username}"

    @admin.display(description="owner", ordering="sandbox__owner__email")
    def owner(self, obj: TelegramLink) -> str:
        return str(obj.sandbox.owner.email)

    @admin.display(description="paired accounts")
    def paired(self, obj: TelegramLink) -> int:
        return len(obj.allowed_user_ids)

    @admin.display(description="updates waiting", ordering="waiting_count")
    def waiting(self, obj: TelegramLink) -> int:
        return int(obj.waiting_count)  # type: ignore[attr-defined]  # get_queryset's annotation

    @admin.action(description="Deliver waiting updates now", permissions=["change"])
    def deliver_now(self, request: HttpRequest, queryset: QuerySet[TelegramLink]) -> None:
        for link in queryset:
            actions.queue_delivery(link.sandbox_id)
        self.message_user(request, f"Queued delivery for {len(queryset)} agent(s).")

    @admin.action(description="Unlink (removes the webhook)", permissions=["change"])
    def unlink(self, request: HttpRequest, queryset: QuerySet[TelegramLink]) -> None:
        count = 0
        for link in queryset:
            actions.disconnect(link)
            count += 1
        self.message_user(request, f"Unlinked {count} bot(s).", messages.SUCCESS)


@admin.register(TelegramUpdate)
class TelegramUpdateAdmin(admin.ModelAdmin[TelegramUpdate]):
    list_display = ("update_id", "link", "received_at", "delivered_at", "attempts", "last_error")
    list_filter = (("delivered_at", admin.EmptyFieldListFilter),)
    search_fields = ("link__bot_username", "sandbox__owner__email", "=update_id")
    list_select_related = ("link",)
    ordering = ("-received_at",)
    fields = (
        "link",
        "sandbox",
        "update_id",
        "received_at",
        "delivered_at",
        "attempts",
        "last_error",
    )
    readonly_fields = fields  # the payload (what the user wrote) is never shown

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
