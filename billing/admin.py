from __future__ import annotations

from django.contrib import admin

from billing.models import Account, Plan


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin[Plan]):
    list_display = (
        "name",
        "slug",
        "is_default",
        "sleeps",
        "sleep_after",
        "monthly_token_quota",
        "requests_per_minute",
        "memory_mb",
        "cpu_millis",
        "internet",
    )
    list_filter = ("sleeps", "internet", "is_default")
    search_fields = ("name", "slug")


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin[Account]):
    list_display = ("user", "plan", "created_at")
    list_filter = ("plan",)
    search_fields = ("user__email", "user__username")
    autocomplete_fields = ("user",)
    list_select_related = ("user", "plan")
