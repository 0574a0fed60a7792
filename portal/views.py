"""Pages users see: the landing page and their dashboard."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from billing.models import plan_for
from sandboxes import actions
from sandboxes.access import get_sandbox_for_user
from sandboxes.models import Sandbox


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
        "events": sandbox.events.all()[:15],
        "usage": _usage(request),
    }
    return render(request, "dashboard.html", context)


def _usage(request: HttpRequest) -> dict[str, object] | None:
    try:
        from billing.usage import month_usage
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
