"""Staff views of the AI gateway: upstreams and their keys, routes, prices, credentials, usage.

Secrets are write-only here: key fields render empty, and leaving one empty keeps the old key.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from ai_gateway.models import (
    ModelRoute,
    Price,
    SandboxCredential,
    SpendCounter,
    Upstream,
    UsageRecord,
    UserProviderKey,
)


class UpstreamForm(forms.ModelForm):
    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Stored encrypted. Leave empty to keep the current key.",
    )

    class Meta:
        model = Upstream
        fields = "__all__"

    def clean_api_key(self) -> str:
        new = str(self.cleaned_data.get("api_key") or "")
        return new or (self.instance.api_key if self.instance.pk else "") or ""


@admin.register(Upstream)
class UpstreamAdmin(admin.ModelAdmin):
    form = UpstreamForm
    list_display = [
        "name", "provider", "base_url", "is_operator", "enabled", "accepts_user_keys", "has_key",
    ]  # fmt: skip
    list_filter = ["provider", "is_operator", "enabled", "accepts_user_keys"]

    @admin.display(boolean=True, description="Key set")
    def has_key(self, obj: Upstream) -> bool:
        return bool(obj.api_key)


@admin.register(ModelRoute)
class ModelRouteAdmin(admin.ModelAdmin):
    list_display = ["pattern", "upstream", "upstream_model", "fallback", "priority"]
    list_editable = ["priority"]
    list_select_related = ["upstream", "fallback"]


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    list_display = [
        "model", "input_per_million", "cached_input_per_million", "output_per_million",
        "updated_at",
    ]  # fmt: skip
    list_editable = ["input_per_million", "cached_input_per_million", "output_per_million"]
    search_fields = ["model"]


@admin.register(SandboxCredential)
class SandboxCredentialAdmin(admin.ModelAdmin):
    list_display = ["prefix", "sandbox", "rotated_at", "last_used_at"]
    readonly_fields = ["sandbox", "prefix", "key_hash", "created_at", "rotated_at", "last_used_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # issued by rotate_credential() when a sandbox starts


@admin.register(UserProviderKey)
class UserProviderKeyAdmin(admin.ModelAdmin):
    list_display = ["user", "provider", "hint", "updated_at"]
    fields = ["user", "provider", "hint", "created_at", "updated_at"]
    readonly_fields = ["user", "provider", "hint", "created_at", "updated_at"]
    search_fields = ["user__email"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # users add their own keys on their settings page


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = [
        "created_at", "user", "sandbox", "model", "input_tokens", "output_tokens",
        "cached_tokens", "cost", "latency_ms", "status_code", "outcome", "byok",
    ]  # fmt: skip
    list_filter = ["outcome", "api", "byok", "fallback_used"]
    search_fields = ["user__email", "model"]
    date_hierarchy = "created_at"
    list_select_related = ["user", "sandbox"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(SpendCounter)
class SpendCounterAdmin(admin.ModelAdmin):
    """What the quota sees without Redis (with Redis, the same figures live there)."""

    list_display = ["user", "month", "used_cost", "used_tokens", "in_flight", "lease_until"]
    list_select_related = ["user"]
    search_fields = ["user__email"]
    readonly_fields = [
        "user", "month", "used_cost", "used_tokens", "reserved_cost", "reserved_tokens",
        "in_flight", "lease_until",
    ]  # fmt: skip

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
