"""Pages users see: the landing page and their dashboard; and where the admin's login leads."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import REDIRECT_FIELD_NAME
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.http import require_POST

from billing.models import plan_for
from billing.views_plans import billing_context
from sandboxes import accounts, actions
from sandboxes.access import get_sandbox_for_user
from sandboxes.models import Sandbox
from sandboxes.views_backups import backup_context


def home(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("dashboard")
    return render(request, "home.html")


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    sandbox = get_sandbox_for_user(request.user)
    context = {
        "sandbox": sandbox,
        "plan": plan_for(request.user),
        **billing_context(request),
        "events": sandbox.events.all()[:15],
        "usage": _usage(request),
        "suspension": accounts.suspension_notice(request.user),
        **backup_context(sandbox, request.user),
    }
    return render(request, "dashboard.html", context)


def _usage(request: HttpRequest) -> dict[str, object] | None:
    try:
        from ai_gateway.usage import month_usage
    except ImportError:
        return None
    return month_usage(request.user)


@login_required
@require_POST
def sandbox_start(request: HttpRequest) -> HttpResponse:
    """Ask for the user's sandbox to start; the work happens in a Celery task."""
    from sandboxes.tasks import provision_sandbox, start_sandbox

    sandbox = get_sandbox_for_user(request.user)
    if sandbox.state == Sandbox.State.PROVISIONING:
        provision_sandbox.delay(sandbox.pk)
    elif sandbox.state in (Sandbox.State.STOPPED, Sandbox.State.SLEEPING, Sandbox.State.FAILED):
        start_sandbox.delay(sandbox.pk)
    actions.record_activity(sandbox)
    return redirect("dashboard")


def admin_login(request: HttpRequest) -> HttpResponse:
    """The admin's login page, which never takes a password itself.

    Send an anonymous visitor to allauth's login, a staff member without TOTP to set it up, one
    whose session has not passed a second factor to allauth's TOTP check, each with ``next``
    kept; send a user who may use the admin on to ``next``. Refuse anyone else who is signed in.
    """
    from portal.admin_site import has_totp, may_use_admin

    next_url = _next_in_admin(request)
    user = request.user
    if not user.is_authenticated:
        return _to("account_login", next_url)
    if may_use_admin(request):
        return HttpResponseRedirect(next_url)
    if not (user.is_active and user.is_staff):
        raise PermissionDenied
    if not has_totp(user):
        messages.warning(
            request,
            "The admin needs two-factor authentication. Set up an authenticator app here, "
            "then open the admin again.",
        )
        return _to("mfa_activate_totp", next_url)
    return _to("mfa_reauthenticate", next_url)


def _next_in_admin(request: HttpRequest) -> str:
    """Return the safe ``next`` of the request, or the admin's index."""
    url = request.GET.get(REDIRECT_FIELD_NAME, "")
    safe = url_has_allowed_host_and_scheme(
        url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return url if url and safe else reverse("admin:index")


def _to(name: str, next_url: str) -> HttpResponseRedirect:
    return HttpResponseRedirect(f"{reverse(name)}?{urlencode({REDIRECT_FIELD_NAME: next_url})}")
