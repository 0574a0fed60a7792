"""Hermit's admin site: staff sign in through allauth, and only with a second factor.

Contract: the admin serves a request only if its user is active staff, has an activated TOTP
authenticator, and passed a second-factor step (allauth's TOTP or recovery code, at login or on
reauthentication) in this very session. The admin's own password form is gone: /admin/login/
sends the browser on to allauth (its rate limits, its TOTP step), to TOTP set-up, or to a
second-factor check, and then back. See portal.views.admin_login.
"""

from __future__ import annotations

from typing import Any

from allauth.account.authentication import get_authentication_records
from allauth.mfa.models import Authenticator
from django.contrib import admin
from django.http import HttpRequest, HttpResponse


def has_totp(user: Any) -> bool:
    """Return True if user has an activated TOTP authenticator."""
    return Authenticator.objects.filter(user=user, type=Authenticator.Type.TOTP).exists()


def passed_second_factor(request: HttpRequest) -> bool:
    """Return True if this session's user passed an allauth second-factor step in it."""
    records = get_authentication_records(request, request.user)
    return any(record.get("method") == "mfa" for record in records)


def may_use_admin(request: HttpRequest) -> bool:
    user = request.user
    return user.is_active and user.is_staff and has_totp(user) and passed_second_factor(request)


class HermitAdminSite(admin.AdminSite):
    site_header = "Hermit administration"
    site_title = "Hermit admin"
    index_title = "Users, plans, sandboxes and the AI gateway"

    def has_permission(self, request: HttpRequest) -> bool:
        return may_use_admin(request)

    def login(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        from portal.views import admin_login

        return admin_login(request)
