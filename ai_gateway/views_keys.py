"""The user's settings page for their own model provider keys (BYOK).

Keys are stored encrypted (``UserProviderKey.api_key``) and shown only masked afterwards. A key
is saved only once the provider accepted it (see ``ProviderKeyForm``). The AI gateway then sends
that user's calls to that provider with it instead of the operator's key, on upstreams that take
user keys, and those calls do not count against the plan's quota.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from ai_gateway.forms import DeleteProviderKeyForm, ProviderKeyForm
from ai_gateway.models import UserProviderKey


@login_required
def provider_keys(request: HttpRequest) -> HttpResponse:
    """GET: list the user's keys (masked) and a form. POST: save, or delete with action=delete."""
    user = request.user
    assert user.is_authenticated
    form = ProviderKeyForm()
    if request.method == "POST":
        if request.POST.get("action") == "delete":
            delete = DeleteProviderKeyForm(request.POST)
            if delete.is_valid():
                provider = delete.cleaned_data["provider"]
                UserProviderKey.objects.filter(user=user, provider=provider).delete()
                messages.success(request, "Key removed: Hermit's own key is used again.")
            return redirect("provider-keys")
        form = ProviderKeyForm(request.POST)
        if form.is_valid():
            key = form.cleaned_data["api_key"]
            UserProviderKey.objects.update_or_create(
                user=user,
                provider=form.cleaned_data["provider"],
                defaults={"api_key": key, "hint": UserProviderKey.mask(key)},
            )
            messages.success(request, "Key saved. Your agent's model calls now use it.")
            return redirect("provider-keys")
    keys = UserProviderKey.objects.filter(user=user).order_by("provider")
    return render(request, "billing/provider_keys.html", {"form": form, "keys": keys})
