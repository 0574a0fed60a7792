"""A user deletes their own account: they confirm with their password, then it goes as a
staff deletion does (sandboxes.accounts.request_deletion: deactivated and signed out now, its
agent stopped, its data, backups and secrets removed after HERMIT_DELETE_GRACE_DAYS)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from sandboxes import accounts


class DeleteAccountForm(forms.Form):
    password = forms.CharField(
        label="Your password",
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )

    def __init__(self, user: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_password(self) -> str:
        password = str(self.cleaned_data.get("password") or "")
        if not self.user.check_password(password):
            raise forms.ValidationError("That is not your password.")
        return password


@login_required
def delete_account(request: HttpRequest) -> HttpResponse:
    """GET: explain and ask for the password. POST: delete the account, sign out."""
    form = DeleteAccountForm(request.user, request.POST if request.method == "POST" else None)
    if form.is_bound and form.is_valid():
        accounts.request_deletion(request.user, by=request.user)
        logout(request)
        messages.success(
            request,
            "Your account is deleted. Your agent has stopped; its data and backups are removed "
            f"within {settings.HERMIT_DELETE_GRACE_DAYS} days.",
        )
        return redirect("home")
    context = {"form": form, "grace_days": settings.HERMIT_DELETE_GRACE_DAYS}
    return render(request, "sandboxes/delete_account.html", context)
