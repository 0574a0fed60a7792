"""Staff acting on users: "Suspend…", "Unsuspend" and "Delete account…" (sandboxes.accounts).

Suspend needs ``sandboxes.suspend_user``; deleting needs ``sandboxes.delete_account``. Both ask
first on a page of their own (a reason for a suspension; a confirmation, naming the grace
period, for a deletion). Users are never deleted outright here: Django's own delete is off, so
every deletion goes through the grace period and is recorded. Staff who are not superusers
cannot grant superuser status, groups or permissions, nor change a superuser's account (so the
"operator" role cannot give itself what it was not given).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse

from sandboxes import accounts
from sandboxes.models import AccountDeletion, Suspension

User = get_user_model()
SUPERUSER_ONLY = ("is_superuser", "groups", "user_permissions")


class SuspendForm(forms.Form):
    reason = forms.CharField(
        max_length=500,
        required=False,
        help_text="Shown to the user in chat and on the dashboard.",
        widget=forms.TextInput(attrs={"size": 80}),
    )


class ConfirmForm(forms.Form):
    confirm = forms.BooleanField(
        label="Yes, delete these accounts after the grace period", required=True
    )


def _ask(
    model_admin: Any,
    request: HttpRequest,
    users: list[Any],
    *,
    action: str,
    title: str,
    explanation: str,
    form: forms.Form,
    button: str,
) -> TemplateResponse:
    context = {
        **model_admin.admin_site.each_context(request),
        "title": title,
        "opts": model_admin.model._meta,
        "users": users,
        "form": form,
        "action": action,
        "explanation": explanation,
        "button": button,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/auth/user/account_action.html", context)


class HermitUserAdmin(UserAdmin):
    list_display = ("username", "email", "is_staff", "account_status", "date_joined")
    list_select_related = ("suspension", "deletion")
    actions = ["suspend", "unsuspend", "delete_account"]

    def has_suspend_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.suspend_user")

    def has_delete_account_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.delete_account")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # "Delete account…" instead: a grace period, and a record

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None and obj.is_superuser and not request.user.is_superuser:
            return False
        return super().has_change_permission(request, obj)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if request.user.is_superuser:
            return fieldsets
        return [
            (name, {**opts, "fields": [f for f in opts["fields"] if f not in SUPERUSER_ONLY]})
            for name, opts in fieldsets
        ]

    def get_list_filter(self, request: HttpRequest) -> Any:
        return ("is_staff", "is_active", "groups")

    @admin.display(description="account")
    def account_status(self, obj: Any) -> str:
        deletion = getattr(obj, "deletion", None)
        if deletion is not None:
            return f"deleted; data goes after {deletion.purge_after:%Y-%m-%d %H:%M} UTC"
        suspension = getattr(obj, "suspension", None)
        if suspension is not None:
            return f"suspended since {suspension.suspended_at:%Y-%m-%d %H:%M} UTC"
        return "active" if obj.is_active else "deactivated"

    @admin.action(description="Suspend…", permissions=["suspend"])
    def suspend(self, request: HttpRequest, queryset: QuerySet[Any]) -> TemplateResponse | None:
        users = list(queryset)
        form = SuspendForm(request.POST if "apply" in request.POST else None)
        if form.is_bound and form.is_valid():
            done = [
                u
                for u in users
                if accounts.suspend_user(u, by=request.user, reason=form.cleaned_data["reason"])
            ]
            messages.info(request, f"Suspended {len(done)} user(s); their agents are stopping.")
            return None
        explanation = (
            "Their agents stop and cannot start, their AI credential is refused, and chat "
            "tells them why (the reason below). Unsuspend undoes it."
        )
        return _ask(
            self, request, users, action="suspend", title="Suspend users",
            explanation=explanation, form=form, button="Suspend",
        )  # fmt: skip

    @admin.action(description="Unsuspend", permissions=["suspend"])
    def unsuspend(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        done = [u for u in queryset if accounts.unsuspend_user(u, by=request.user)]
        messages.info(request, f"Lifted the suspension of {len(done)} user(s).")

    @admin.action(description="Delete account…", permissions=["delete_account"])
    def delete_account(
        self, request: HttpRequest, queryset: QuerySet[Any]
    ) -> TemplateResponse | None:
        users = list(queryset)
        form = ConfirmForm(request.POST if "apply" in request.POST else None)
        if form.is_bound and form.is_valid():
            for user in users:
                accounts.request_deletion(user, by=request.user)
            messages.info(
                request,
                f"Deleted {len(users)} account(s): they are deactivated now, and their data "
                f"goes after {settings.HERMIT_DELETE_GRACE_DAYS} day(s).",
            )
            return None
        explanation = (
            "Each account is deactivated now (no sign-in, its agent stops, its AI credential is "
            "refused). Its agent's data, backups and secrets are removed after "
            f"{settings.HERMIT_DELETE_GRACE_DAYS} day(s) (HERMIT_DELETE_GRACE_DAYS); until then "
            "the deletion can be cancelled under Account deletions."
        )
        return _ask(
            self, request, users, action="delete_account", title="Delete accounts",
            explanation=explanation, form=form, button="Delete",
        )  # fmt: skip


class SuspensionAdmin(admin.ModelAdmin[Suspension]):
    list_display = ("user", "reason", "suspended_at", "suspended_by")
    search_fields = ("user__email", "reason")
    list_select_related = ("user", "suspended_by")
    readonly_fields = ("user", "reason", "suspended_at", "suspended_by")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # through the user admin's "Suspend…", which stops the agents

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # through "Unsuspend", which records it


class AccountDeletionAdmin(admin.ModelAdmin[AccountDeletion]):
    list_display = (
        "email",
        "requested_at",
        "requested_by",
        "by_owner",
        "purge_after",
        "purged_at",
    )
    list_filter = ("by_owner", ("purged_at", admin.EmptyFieldListFilter))
    search_fields = ("email",)
    list_select_related = ("requested_by",)
    readonly_fields = [f.name for f in AccountDeletion._meta.fields]
    actions = ["cancel"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the record of who deleted what, and when

    def has_delete_account_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("sandboxes.delete_account")

    @admin.action(description="Cancel the deletion (reactivate)", permissions=["delete_account"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[AccountDeletion]) -> None:
        done = [
            d
            for d in queryset.select_related("user")
            if accounts.cancel_deletion(d, by=request.user)
        ]
        messages.info(
            request, f"Cancelled {len(done)} deletion(s); those accounts are active again."
        )


def register_user_admins(site: admin.AdminSite) -> None:
    """Put the user admin with these actions in place of Django's, and add the others."""
    if site.is_registered(User):
        site.unregister(User)
    site.register(User, HermitUserAdmin)
    site.register(Suspension, SuspensionAdmin)
    site.register(AccountDeletion, AccountDeletionAdmin)
